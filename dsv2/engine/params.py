"""SamplingParams: the per-request knobs, named and bounded as in vLLM so its users need no manual.

Differences from vLLM, all deliberate: max_tokens must be an int (no None = "up to the context"),
there is no best_of, logit_bias or guided decoding, and temperatures in
[1e-6, 0.01) are kept as given (vLLM raises them to 0.01; float32 logits divided by such a
temperature are still finite, and softmax subtracts the maximum). Below 1e-6 (and a repetition
penalty below 1e-6) the quotient can overflow to inf and fail the step of every request batched
with it, so such values are refused here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
_INT64_MAX = 2**63 - 1  # top_k goes into an int64 tensor
MIN_DIVISOR = 1e-6  # the smallest non-zero temperature and repetition penalty (logits are divided by them)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off (-1 is normalized to 0)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Each request draws from its own generator seeded with this, so its samples do not depend on
    # which other requests share its batch. With n > 1, sequence i uses seed + i (as vLLM does).
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int = 16
    min_tokens: int = 0
    logprobs: int | None = None  # top-N logprobs per generated token; 0 = only the chosen token's
    prompt_logprobs: int | None = None  # the same for each prompt token (the first has none)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        for name in ("n", "top_k", "max_tokens", "min_tokens"):
            _check_int(name, getattr(self, name))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            _check_real(name, getattr(self, name))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not (self.temperature == 0 or self.temperature >= MIN_DIVISOR):
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_DIVISOR}, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not -1 <= self.top_k <= _INT64_MAX:
            raise ValueError(f"top_k must be 0 or -1 (off) or at least 1, got {self.top_k}")
        self.top_k = max(self.top_k, 0)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty >= MIN_DIVISOR:
            raise ValueError(f"repetition_penalty must be at least {MIN_DIVISOR}, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value)
                if not 0 <= value <= MAX_LOGPROBS:
                    raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}] or None, got {value}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]:
                raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")

        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must be a str or a list of str, got an element {s!r}")
            if not s:
                raise ValueError("stop cannot contain an empty string")

        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative ints, got an element {t!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0)


def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")


def _check_real(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")

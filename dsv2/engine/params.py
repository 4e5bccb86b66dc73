"""SamplingParams: the per-request knobs, named and bounded as in vLLM so its users need no manual;
StructuredOutputsParams: vLLM's guided decoding (a JSON schema, any JSON object, a regex, a choice
or a grammar), compiled by engine/structured.py.

Differences from vLLM, all deliberate: max_tokens must be an int (no None = "up to the context"),
there is no best_of, logit_bias values outside OpenAI's [-100, 100] are refused (vLLM's server
clamps them), JSON whitespace between tokens is bounded (engine/structured.py says why), and
temperatures in [1e-6, 0.01) are kept as given (vLLM raises them to 0.01; float32 logits divided
by such a temperature are still finite, and softmax subtracts the maximum). Below 1e-6 (and a repetition
penalty below 1e-6) the quotient can overflow to inf and fail the step of every request batched
with it, so such values are refused here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
_INT64_MAX = 2**63 - 1  # top_k goes into an int64 tensor
MIN_DIVISOR = 1e-6  # the smallest non-zero temperature and repetition penalty (logits are divided by them)
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value, either sign


@dataclass
class StructuredOutputsParams:
    """vLLM's structured outputs: exactly one of `json` (a JSON schema, as a dict or its JSON text),
    `json_object` (any JSON object), `regex`, `choice` (the output is one of these strings) or
    `grammar` (Lark, or llama.cpp's GBNF). The output is held to it token by token; the engine
    compiles it when the request arrives (a ValueError there names what is wrong with it).
    `disable_any_whitespace`: JSON without whitespace between its tokens (vLLM's option; by
    default any JSON whitespace is allowed, as in vLLM)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self):
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice and "
                             f"grammar, got {', '.join(given) or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"structured_outputs.{name} must be a str")
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
        if self.choice is not None:
            self.choice = list(self.choice)
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of str")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.disable_any_whitespace must be a bool")

        self.key = self._key()

    def _key(self) -> tuple[str, str, bool]:
        """(kind, the spec as canonical text, disable_any_whitespace): what its compiled grammar is
        cached by (engine/structured.py)."""
        if self.json is not None:
            try:  # sorted keys: the same schema written in another order is the same grammar
                return "json", json.dumps(self.json, sort_keys=True, allow_nan=False), self.disable_any_whitespace
            except (TypeError, ValueError, RecursionError) as e:  # NaN, a value JSON cannot hold
                raise ValueError(f"structured_outputs.json is not a JSON value: {e}") from None
        if self.json_object:
            return "json", '{"type": "object"}', self.disable_any_whitespace
        if self.regex is not None:
            return "regex", self.regex, False
        if self.choice is not None:
            return "choice", json.dumps(self.choice), False
        return "grammar", self.grammar, False


OUTPUT_KINDS = ("cumulative", "final_only")


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
    # {token id: bias} added to the logits before sampling (OpenAI's: each in [-100, 100])
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's RequestOutputKind: "cumulative", an output at every step that makes progress (each with
    # all of the text and tokens so far); "final_only", one output when the request finishes
    # (LLM.generate's: a large batch then builds no per-step outputs it would throw away)
    output_kind: str = "cumulative"

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
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}")
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

        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            for t, bias in self.logit_bias.items():
                if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                    raise ValueError(f"logit_bias keys must be non-negative token ids, got {t!r}")
                _check_real("logit_bias", bias)
                if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {t}")
            self.logit_bias = {t: float(b) for t, b in self.logit_bias.items()} or None
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")

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

"""A request's whole state as it moves through the engine (one Sequence per sample when n > 1)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


# In a sequence's output_token_ids: a token sampled by a launched step, not yet read back.
PENDING = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_token_ids: list[int]
    params: "object"  # SamplingParams
    arrival: int  # admission order: first come, first served, also when preempted
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose latent KV is in the cache
    num_cached_tokens: int = 0  # of those, taken from the prefix cache at admission
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None
    detokenizer: "object | None" = None
    grammar: "object | None" = None  # structured.Grammar: the output's matcher, for structured outputs
    text: str = ""
    logprobs: list = field(default_factory=list)
    # prompt_logprobs: entry i for prompt token i (None for the first), filled as chunks run
    prompt_logprobs: list | None = None
    cumulative_logprob: float = 0.0
    num_preemptions: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def resolved_output_ids(self) -> list[int]:
        """The output tokens read back so far (without one still in flight)."""
        out = self.output_token_ids
        return out[:-1] if out and out[-1] == PENDING else list(out)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asked for and not all computed yet: such a sequence computes its whole prompt itself
        (no prefix-cache hits, whose tokens would have no logits). Chunks fill the entries in
        order, so the last one is filled last."""
        pl = self.prompt_logprobs
        return pl is not None and len(pl) > 1 and pl[-1] is None

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

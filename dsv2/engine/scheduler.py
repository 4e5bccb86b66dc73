"""Continuous batching with chunked prefill under a token budget, first come first served.

Each step hands out at most `max_num_batched_tokens` tokens: running sequences first, in arrival
order (a decode needs one token, an unfinished prefill the next chunk of its prompt), then waiting
ones while the budget, `max_num_seqs` and free blocks allow. When the cache cannot grow a running
sequence, the latest-arrived running sequence is preempted: its blocks are freed and it goes back
to the head of the queue to be recomputed (prompt + what it generated) later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .cache import BlockManager
from .sequence import PENDING, Sequence, Status


@dataclass
class ScheduledBatch:
    items: list[tuple[Sequence, int]]  # (sequence, tokens to compute this step)
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int | None = None):
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # back in arrival order among the waiting, ahead of anything that came after it
        items = sorted([*self.waiting, seq], key=lambda s: s.arrival)
        self.waiting = deque(items)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        items: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.status is not Status.RUNNING or budget == 0:  # preempted earlier in this loop
                continue
            if self._ends_with_pending(seq):
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_append(seq.block_table, seq.num_computed_tokens + n):
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.append(seq.block_table, seq.num_computed_tokens + n)
                items.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            tokens = seq.all_token_ids
            reuse = not seq.needs_prompt_logprobs
            if not self.blocks.can_allocate(tokens, reuse):
                break
            seq.block_table, seq.num_cached_tokens = self.blocks.allocate(tokens, reuse)
            seq.num_computed_tokens = seq.num_cached_tokens
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            items.append((seq, n))
            budget -= n
        return ScheduledBatch(items, preempted)

    def _ends_with_pending(self, seq: Sequence) -> bool:
        """The token a launched step has in flight is this sequence's last by length: computing
        after it would be waste (it finishes when that token is read back)."""
        out = seq.output_token_ids
        return bool(out) and out[-1] == PENDING and (
            len(out) >= seq.params.max_tokens
            or (self.max_model_len is not None and seq.num_tokens >= self.max_model_len))

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []

"""Training batches from prepared token shards, in a seeded order that a checkpoint can resume exactly.

A split is one token stream (documents back to back, each as BOS, its tokens, EOS) cut into non-overlapping
windows of seq_len + 1 tokens; a window gives the inputs (its first seq_len tokens) and the targets
(its last seq_len). Windows are served in a permutation drawn from (seed, epoch) alone, so the
position in it (epoch, cursor) is the loader's whole state: no RNG state to save, and a restored
loader yields exactly the batches the original would have yielded next, whatever batch sizes follow.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .prepare import read_meta


class TokenLoader:
    def __init__(self, data_dir: str | Path, split: str, seq_len: int, seed: int = 0):
        data_dir = Path(data_dir)
        meta = read_meta(data_dir)
        if split not in meta["splits"]:
            raise ValueError(f"no split {split!r} in {data_dir}; it has {', '.join(meta['splits'])}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        dtype = np.dtype(meta["dtype"])
        self.vocab_size = meta["vocab_size"]
        self.eos_id = meta["eos_id"]
        self.split = split
        self.seq_len = seq_len
        # Memory-mapped: pages are read on demand and shared with other processes on the machine.
        self._shards = []
        for shard in meta["splits"][split]["shards"]:
            path = data_dir / shard["file"]
            if path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise ValueError(f"{path} does not have the {shard['tokens']} tokens meta.json lists")
            self._shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])
        self.num_tokens = int(self._starts[-1])
        self.num_windows = self.num_tokens // (seq_len + 1)
        if self.num_windows == 0:
            raise ValueError(f"the {split} split of {data_dir} has {self.num_tokens} tokens, fewer than one "
                             f"window of seq_len + 1 = {seq_len + 1}")
        self.seed = seed
        self.epoch = 0
        self.cursor = 0  # windows of this epoch's permutation already served
        self._order: tuple[tuple[int, int], np.ndarray] | None = None  # (seed, epoch), permutation

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch_size windows: (inputs, targets), each [batch_size, seq_len] int64."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        windows = []
        while len(windows) < batch_size:
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
            take = min(batch_size - len(windows), self.num_windows - self.cursor)
            windows.extend(self._permutation()[self.cursor : self.cursor + take])
            self.cursor += take
        return self._batch(np.stack([self._window(w) for w in windows]))

    def iter_eval(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split's windows in stream order (the last batch may be smaller); leaves the state alone."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        span = self.seq_len + 1
        for number, first in enumerate(range(0, self.num_windows, batch_size)):
            if max_batches is not None and number >= max_batches:
                return
            last = min(first + batch_size, self.num_windows)
            yield self._batch(self._tokens(first * span, last * span).reshape(-1, span))

    def state_dict(self) -> dict:
        # seq_len and num_windows only guard against restoring into a loader over other windows.
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "seq_len": self.seq_len, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seq_len", "num_windows"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]}, this loader {getattr(self, key)}: "
                                 "it was saved for other data or another sequence length")
        if not 0 <= state["cursor"] <= self.num_windows:
            raise ValueError(f"loader state cursor {state['cursor']} is outside [0, {self.num_windows}]")
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != (self.seed, self.epoch):
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = ((self.seed, self.epoch), rng.permutation(self.num_windows))
        return self._order[1]

    def _window(self, index: int) -> np.ndarray:
        span = self.seq_len + 1
        return self._tokens(index * span, (index + 1) * span)

    def _tokens(self, start: int, stop: int) -> np.ndarray:
        """Stream positions [start, stop), which may cross shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            offset = start - self._starts[shard]
            end = min(stop, self._starts[shard + 1])
            pieces.append(self._shards[shard][offset : offset + end - start])
            start, shard = end, shard + 1
        return np.concatenate(pieces)

    @staticmethod
    def _batch(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(windows.astype(np.int64))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

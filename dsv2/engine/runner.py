"""Runs the model over one scheduled batch: each row is one sequence's chunk (a prefill chunk or a
single decode token), its latents written into the sequence's pages and attention reading every
cached token of the sequence back from them.

The model is the same one training uses; only the cache differs. Here the cache gathers each
row's pages into a dense [B, T] view: simple and correct on CPU and GPU. A decode-only batch runs
the absorbed form of MLA (attention straight over the 576-wide latent), any batch with a prefill
the expanded form.
"""

from __future__ import annotations

import torch

from ..model import Transformer
from .cache import PagedLatentCache
from .kernels.mla_decode import mla_decode
from .sequence import Sequence


class PagedBatchCache:
    """The model's cache protocol (`begin`, `write`) over a PagedLatentCache for one step."""

    def __init__(self, pages: PagedLatentCache, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 decode_kernel: bool = False):
        self.pages = pages
        self.block_tables = block_tables  # [B, max_blocks]
        self.context_lens = context_lens  # [B] tokens each row attends to after this step
        self.decode_kernel = decode_kernel  # the model then calls store + decode_attention
        self._slots: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None

    def begin(self, positions: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        self._slots, self._valid = slots, valid
        t = self.block_tables.shape[1] * self.pages.block_size
        key = torch.arange(t, device=positions.device)
        # a sequence's cached tokens sit at key index == position; causal within the row
        mask = (key[None, None, :] <= positions[:, :, None]) & (key[None, None, :] < self.context_lens[:, None, None])
        # padding queries see key 0 only, which every row has, so their rows stay finite
        mask = mask | (~valid[:, :, None] & (key[None, None, :] == 0))
        return mask[:, None]

    def store(self, layer: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        self.pages.write(layer, self._slots[self._valid], c_kv[self._valid], k_rope[self._valid])

    def write(self, layer: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.store(layer, c_kv, k_rope)
        return self.pages.gather(layer, self.block_tables, self.context_lens)

    def decode_attention(self, layer: int, q_latent: torch.Tensor, q_rope: torch.Tensor, scale: float):
        """[B, H, r] latent outputs of one decode token per row, by the Triton kernel over the pages."""
        return mla_decode(q_latent, q_rope, self.pages.kv[layer], self.block_tables, self.context_lens,
                          scale, self.pages.kv_lora_rank)


class ModelRunner:
    def __init__(self, model: Transformer, pages: PagedLatentCache, use_kernel: bool = True):
        self.model = model
        self.pages = pages
        self.device = next(model.parameters()).device
        r, dr = pages.kv_lora_rank, pages.rope_dim
        # the kernel reads plain (unquantized) 576-wide rows on CUDA; tl.dot wants power-of-two dims >= 16
        self.use_kernel = (use_kernel and self.device.type == "cuda" and pages.kv is not None
                           and all(d >= 16 and d & (d - 1) == 0 for d in (r, dr, pages.block_size)))

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute each item's next tokens; return the logits [B, V] at each row's last token."""
        bs = self.pages.block_size
        width = max(n for _, n in items)
        rows = len(items)
        tokens = torch.zeros(rows, width, dtype=torch.long)
        positions = torch.zeros(rows, width, dtype=torch.long)
        valid = torch.zeros(rows, width, dtype=torch.bool)
        slots = torch.zeros(rows, width, dtype=torch.long)
        max_blocks = max(len(seq.block_table) for seq, _ in items)
        tables = torch.zeros(rows, max_blocks, dtype=torch.long)
        context = torch.zeros(rows, dtype=torch.long)
        for i, (seq, n) in enumerate(items):
            start = seq.num_computed_tokens
            ids = seq.all_token_ids[start:start + n]
            pos = torch.arange(start, start + n)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            tokens[i, :n] = torch.tensor(ids, dtype=torch.long)
            positions[i, :n] = pos
            valid[i, :n] = True
            slots[i, :n] = table[pos // bs] * bs + pos % bs
            tables[i, : len(seq.block_table)] = table
            context[i] = start + n
        to = dict(device=self.device)
        decode = width == 1
        cache = PagedBatchCache(self.pages, tables.to(**to), context.to(**to), decode and self.use_kernel)
        logits = self.model(tokens.to(**to), positions.to(**to), valid.to(**to), cache, slots.to(**to),
                            absorb=decode)
        last = torch.tensor([n - 1 for _, n in items], device=self.device)
        return logits[torch.arange(rows, device=self.device), last].float()

"""A contiguous latent KV cache: per layer, c_kv and k_rope for every slot of every sequence.

MLA caches only (kv_lora_rank + qk_rope_head_dim) numbers per token per layer. The MHA baseline
uses the same cache with its rotated keys in `c_kv` and its values in `k_rope` (n_kv d_h numbers
each, its key/value heads': `ModelConfig.cache_widths`). Each slot also records its token's position and whether it
holds a real token, so that left padding, right padding and ragged decoding all reduce to one rule:
a query attends to the valid slots whose position is not after its own. The engine's paged cache
keeps the same contract.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class LatentCache:
    def __init__(self, config: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        layers = config.num_hidden_layers
        c_kv_width, k_rope_width = config.cache_widths()
        self.c_kv = torch.zeros(layers, batch, max_len, c_kv_width, device=device, dtype=dtype)
        self.k_rope = torch.zeros(layers, batch, max_len, k_rope_width, device=device, dtype=dtype)
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # slots in use: every sequence's slots lie below this
        self._slots: torch.Tensor | None = None

    def begin(self, positions: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Claim `slots` [B, S] for this step's tokens; return the attention mask [B, 1, S, T]."""
        if int(slots.max()) >= self.max_len:
            raise ValueError(f"cache holds {self.max_len} slots; step writes slot {int(slots.max())}")
        self._slots = slots
        self.positions.scatter_(1, slots, positions)
        self.valid.scatter_(1, slots, valid)
        self.length = max(self.length, int(slots.max()) + 1)
        t = self.length
        key_pos, key_valid = self.positions[:, None, :t], self.valid[:, None, :t]
        mask = key_valid & (key_pos <= positions[:, :, None])
        # a padding query sees only itself, so its (unused) row stays finite
        own = torch.arange(t, device=slots.device)[None, None, :] == slots[:, :, None]
        return (mask | (own & ~valid[:, :, None]))[:, None]

    def layer(self, i: int) -> LatentLayer:
        return LatentLayer(self, i)


class LatentLayer:
    """Layer i's part of a LatentCache (the model's `LayerCache`)."""

    def __init__(self, cache: LatentCache, i: int):
        self.cache, self.c_kv, self.k_rope = cache, cache.c_kv[i], cache.k_rope[i]

    def write(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.cache._slots[..., None]
        self.c_kv.scatter_(1, idx.expand(-1, -1, c_kv.shape[-1]), c_kv.to(self.c_kv.dtype))
        self.k_rope.scatter_(1, idx.expand(-1, -1, k_rope.shape[-1]), k_rope.to(self.k_rope.dtype))
        t = self.cache.length
        return self.c_kv[:, :t], self.k_rope[:, :t]

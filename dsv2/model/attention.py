"""Multi-head Latent Attention (MLA), in its two equivalent forms.

Keys and values come from the compressed latent c_kv = RMSNorm(W^DKV h) plus one rope key k_rope
shared by all heads; only (c_kv, k_rope) are cached. The expanded form projects the latent up to
per-head K/V (W^UK, W^UV, stacked per head in kv_b_proj) and runs ordinary attention: the choice for
training and long prefills. The absorbed form folds W^UK into the query and W^UV into the output,
so attention reads the latent directly (keys of kv_lora_rank + rope dims, values of kv_lora_rank):
the choice for decoding, where the cache, not the compute, is the cost.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .kernels.small_linear import batched_small_linear, linears
from .norm import RMSNorm
from .rope import apply_rope


class LayerCache(Protocol):
    """One layer's part of a step's cache (`cache.layer(i)`). It holds that layer's tensors, not its
    index, so the blocks it is handed to are identical programs: a compiled block serves every layer."""

    def write(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's latents; return every cached latent [B, T, r] and rope key [B, T, dr]."""


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.softmax_scale = config.softmax_scale
        d, h, bias = config.hidden_size, self.n_heads, config.attention_bias
        q_out = h * config.qk_head_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x's two down-projections, q_proj (or q_a_proj) and kv_a_proj_with_mqa: one launch for a
        decode batch of a few rows (kernels/small_linear.py), two linears otherwise."""
        q, kv = linears(x, self.q_proj if self.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa)
        return q, kv

    def query(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_proj's (or q_a_proj's) output -> q_nope [B, S, H, nope], q_rope [B, S, H, rope] (rotated)."""
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.unflatten(-1, (self.n_heads, -1))
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def latent(self, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_a_proj_with_mqa's output -> c_kv [B, S, kv_lora_rank] (normed), k_rope [B, S, rope]
        (rotated): what the cache holds."""
        c_kv, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_rope, cos, sin)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """o_proj, through the few-row kernel on decode batches."""
        return linears(o, self.o_proj)[0]

    def w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W^UK [H, nope, r] and W^UV [H, v, r]."""
        w = self.kv_b_proj.weight.unflatten(0, (self.n_heads, -1))
        return w[:, : self.nope_dim], w[:, self.nope_dim:]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        absorb: bool = False,
    ) -> torch.Tensor:
        """x [B, S, d]; mask [B, 1, S, T] bool (True = attend) or None for plain causal over S."""
        q, kv = self.project(x)
        if absorb and getattr(cache, "decode_kernel", False):
            return self._paged_decode(q, kv, cos, sin, cache)
        q_nope, q_rope = self.query(q, cos, sin)
        c_kv, k_rope = self.latent(kv, cos, sin)
        if cache is not None:
            c_kv, k_rope = cache.write(c_kv, k_rope)
        attend = self._absorbed if absorb else self._expanded
        o = attend(q_nope, q_rope, c_kv, k_rope, mask)  # [B, S, H, v]
        return self.out(o.flatten(-2))

    def _expanded(self, q_nope, q_rope, c_kv, k_rope, mask):
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, -1))  # [B, T, H, nope + v]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        # v keeps its own head dim: cuDNN attention takes it as it is (padding v to the qk width
        # for flash measured 14% slower on an H100, bench/RESULTS.md)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale,
        )
        return o.transpose(1, 2)

    def _paged_decode(self, q, kv, cos, sin, cache):
        """One decode token per row, attention by the cache's kernels straight over its pages. The
        cache's prologue norms, rotates and stores the latent and rotates q_rope (what `latent` and
        `query` do, in one launch on CUDA), giving q_nope head-major for W^UK; its attention returns
        each head's value, W^UV applied."""
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q[:, 0].unflatten(-1, (self.n_heads, -1))
        q_nope, q_rope = cache.decode_prologue(q, kv[:, 0], cos[:, 0], sin[:, 0], self.kv_a_layernorm)
        w_uk, w_uv = self.w_uk_uv()
        q_latent = batched_small_linear(q_nope, w_uk.transpose(1, 2)).transpose(0, 1)
        o = cache.decode_attention(q_latent, q_rope, self.softmax_scale, w_uv)  # W^UV applied: [B, H, v]
        return self.out(o.flatten(-2))[:, None]

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, mask):
        # score = (q_nope W^UK) . c_kv + q_rope . k_rope: one 576-wide key shared by every head
        w_uk, w_uv = self.w_uk_uv()
        q_latent = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)
        scores = torch.einsum("bshr,btr->bhst", q_latent, c_kv) + torch.einsum("bshd,btd->bhst", q_rope, k_rope)
        scores = scores.float() * self.softmax_scale
        if mask is None:
            s, t = scores.shape[-2:]
            mask = torch.ones(s, t, dtype=torch.bool, device=scores.device).tril(t - s)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(c_kv.dtype)
        o_latent = torch.einsum("bhst,btr->bshr", probs, c_kv)
        return torch.einsum("bshr,hvr->bshv", o_latent, w_uv)  # W^UV folded in after attention

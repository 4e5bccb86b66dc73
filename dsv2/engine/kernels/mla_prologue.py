"""What MLA does between its projections and the absorbed decode attention, in one launch.

For one decode token per row, from the projections' outputs q [B, H, nope + rope] and
kv [B, kv_lora_rank + rope] (kv_a_proj_with_mqa's output):
    c_kv   = RMSNorm(kv[:, :r])                          (kv_a_layernorm)
    k_rope = RoPE(kv[:, r:])                            written with c_kv to the row's cache slot
    q_rope = RoPE(q[:, :, nope:])                       [B, H, rope]
    q_nope = q[:, :, :nope] laid out head-major          [H, B, nope], as W^UK's batched GEMV reads it
with the rotation's cos and sin computed here from each row's position (what RotaryEmbedding
computes: the compiled step otherwise recomputed them in a small kernel for about half the layers).
Compiled, these were four kernels a layer (the norm's statistics, the norm with the cache row's
concatenation, two rotations) and the cache write one more: about 8 us of a batch-1 step's layer on
an H100, most of it launch and ramp, for a few kilobytes (2.9 us now). Here one program
per row does all of it. The arithmetic is the model's (fp32 statistics and rotation, rounded where
the model rounds), so the cache holds the same values as the modules' path writes.
"""

from __future__ import annotations

import torch

from ...model.kernels import pdl
from ...model.norm import rms_norm
from ...model.rope import apply_rope

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None


def mla_prologue_reference(q, kv, cos, sin, norm_weight, eps: float, kv_lora_rank: int):
    """q [B, H, nope + dr], kv [B, r + dr], cos/sin [B, dr/2] fp32 -> q_nope [H, B, nope],
    q_rope [B, H, dr] (q's dtype) and the cache rows [B, r + dr] (kv's dtype): the modules' math."""
    c_kv, k_rope = kv.split([kv_lora_rank, kv.shape[-1] - kv_lora_rank], dim=-1)
    c_kv = rms_norm(c_kv, norm_weight, eps)
    k_rope = apply_rope(k_rope, cos, sin)
    q_nope, q_rope = q.split([q.shape[-1] - k_rope.shape[-1], k_rope.shape[-1]], dim=-1)
    q_rope = apply_rope(q_rope[:, None], cos[:, None], sin[:, None])[:, 0]
    return q_nope.transpose(0, 1).contiguous(), q_rope, torch.cat([c_kv, k_rope], dim=-1)


if triton is not None:

    @triton.jit
    def _prologue_kernel(
        q_ptr, kv_ptr, pos_ptr, inv_freq_ptr, w_ptr, cache_ptr, slots_ptr, q_nope_ptr, q_rope_ptr,
        B, eps, attention_factor, stride_qb, stride_qh, stride_kvb,
        H: tl.constexpr, NOPE: tl.constexpr, R: tl.constexpr, DR: tl.constexpr,
        BLOCK_H: tl.constexpr, USE_GDC: tl.constexpr,
    ):
        pdl.grid_wait(USE_GDC)
        b = tl.program_id(0).to(tl.int64)
        dtype = q_nope_ptr.dtype.element_ty
        half = tl.arange(0, DR // 2)
        # RotaryEmbedding's fp32 math, with the cos and sin that inductor's code for it calls
        freqs = tl.load(pos_ptr + b).to(tl.float32) * tl.load(inv_freq_ptr + half).to(tl.float32)
        cos = tl.cos(freqs) * attention_factor
        sin = tl.sin(freqs) * attention_factor

        # the latent: RMSNorm in fp32, rounded to the activations' dtype, times the weight in it
        offs_r = tl.arange(0, R)
        c = tl.load(kv_ptr + b * stride_kvb + offs_r).to(tl.float32)
        inv = tl.rsqrt(tl.sum(c * c, axis=0) / R + eps)
        normed = (c * inv).to(dtype).to(tl.float32)
        c_kv = (tl.load(w_ptr + offs_r).to(dtype).to(tl.float32) * normed).to(dtype)
        # rope rotates interleaved pairs (2i, 2i + 1), as the checkpoint's weight order has them
        k0 = tl.load(kv_ptr + b * stride_kvb + R + 2 * half).to(tl.float32)
        k1 = tl.load(kv_ptr + b * stride_kvb + R + 2 * half + 1).to(tl.float32)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        row = cache_ptr + slot * (R + DR)
        out_ty = cache_ptr.dtype.element_ty
        tl.store(row + offs_r, c_kv.to(out_ty))
        tl.store(row + R + 2 * half, (k0 * cos - k1 * sin).to(dtype).to(out_ty))
        tl.store(row + R + 2 * half + 1, (k0 * sin + k1 * cos).to(dtype).to(out_ty))

        for h0 in tl.static_range(0, H, BLOCK_H):
            heads = h0 + tl.arange(0, BLOCK_H)
            hmask = heads < H
            q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
            offs_n = tl.arange(0, NOPE)
            nope = tl.load(q_row + offs_n[None, :], mask=hmask[:, None])
            tl.store(q_nope_ptr + (heads[:, None] * B + b) * NOPE + offs_n[None, :], nope, mask=hmask[:, None])
            q0 = tl.load(q_row + NOPE + 2 * half[None, :], mask=hmask[:, None]).to(tl.float32)
            q1 = tl.load(q_row + NOPE + 2 * half[None, :] + 1, mask=hmask[:, None]).to(tl.float32)
            out = q_rope_ptr + (b * H + heads[:, None]) * DR + 2 * half[None, :]
            tl.store(out, (q0 * cos[None, :] - q1 * sin[None, :]).to(dtype), mask=hmask[:, None])
            tl.store(out + 1, (q0 * sin[None, :] + q1 * cos[None, :]).to(dtype), mask=hmask[:, None])


def prologue_supported(q: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int) -> bool:
    """tl.arange wants power-of-two extents: the latent, the nope and the rope widths."""
    dr = kv.shape[-1] - kv_lora_rank
    nope = q.shape[-1] - dr
    return triton is not None and q.is_cuda and all(d >= 2 and d & (d - 1) == 0 for d in (kv_lora_rank, dr, nope))


def launch(q, kv, positions, inv_freq, attention_factor, norm_weight, eps, cache, slots, kv_lora_rank):
    """The Triton path: writes the cache rows (cache [slots..., r + dr] viewed flat) and returns
    (q_nope [H, B, nope], q_rope [B, H, dr]); positions [B] and RotaryEmbedding's inv_freq
    [dr/2] and attention_factor give the rotation."""
    b, h, width = q.shape
    dr = kv.shape[-1] - kv_lora_rank
    nope = width - dr
    assert q.stride(-1) == 1 and kv.stride(-1) == 1 and positions.shape == (b,) and inv_freq.shape == (dr // 2,)
    q_nope = q.new_empty(h, b, nope)
    q_rope = q.new_empty(b, h, dr)
    if b:
        _prologue_kernel[(b,)](
            q, kv, positions, inv_freq, norm_weight, cache, slots, q_nope, q_rope,
            b, eps, attention_factor, q.stride(0), q.stride(1), kv.stride(0),
            H=h, NOPE=nope, R=kv_lora_rank, DR=dr, BLOCK_H=min(16, triton.next_power_of_2(h)), num_warps=4,
            **pdl.options(q))
    return q_nope, q_rope

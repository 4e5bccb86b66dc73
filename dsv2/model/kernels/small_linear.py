"""Linear layers for one to four rows (small decode batches): y = x @ W^T at memory speed.

With a row or two, a linear layer is a weight read. cuBLAS picks tensor-core tiles of 64 or more
output columns for these shapes, which leaves most SMs idle on V2-Lite's 576-to-3,072-wide
projections (kv_a_proj_with_mqa at 6.1 us for 2.4 MB, a fifth of copy bandwidth, on an H100).
Here a program owns two output columns and reads 1,024-element runs of their weight rows, so even a
576-wide projection spreads over 288 programs; the products are summed in fp32 on the CUDA cores
(no tensor cores: at M <= 4 the arithmetic is nothing). Two projections of the same input (MLA's
q_proj or q_a_proj with kv_a_proj_with_mqa) run in one launch, the second's columns after the
first's, and a leading batch dimension (heads, for W^UV) is a second grid axis.
Every launch parameter comes from shapes: steps that call it stay capturable in CUDA graphs.
On an H100 (bench/RESULTS.md, bench/small_linear_bench.py), one row, cuBLAS -> this: q_proj 7.4 ->
6.4 us, kv_a 6.1 -> 3.1, o_proj 6.3 -> 4.8, lm_head 153 -> 134.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..fp8 import FP8
from . import fp8_gemm, pdl
from .fp8_gemm import fp8_supported

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use F.linear
    triton = None

MAX_ROWS = 4  # from 4 rows on, cuBLAS's tensor-core tiles are as fast (bench/RESULTS.md)
# FP8 weights: elements per K step of a program and the longest run of one row (bench/fp8_engine_bench.py
# --sections tune-decode measures the choices)
FP8_TILE = (4096, 1024, 4, 4)  # elements, run, warps, stages


if triton is not None:

    @triton.jit
    def _load_x(x_ptrs, s_ptrs, k0, K, m_mask, k_mask, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                SCALED: tl.constexpr):
        """A [BLOCK_M, BLOCK_K] tile of x in fp32. SCALED (FP8 weights; BLOCK_K a multiple of 128 and
        k0 of BLOCK_K; the program's weight rows inside one 128-row block, whose scales s_ptrs points
        at): each 128-group of a row rounded to e4m3 as kernels/fp8_gemm.py's GEMMs round it (the
        same logits whichever kernel runs), times its activation scale and its weight block's scale,
        so that the raw e4m3 weights multiply it directly."""
        xt = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        if SCALED:
            GROUPS: tl.constexpr = BLOCK_K // 128
            offs_g = tl.arange(0, GROUPS)
            q, x_scale = fp8_gemm.quant_groups(tl.reshape(xt, (BLOCK_M * GROUPS, 128)))
            w_scale = tl.load(s_ptrs + k0 // 128 + offs_g, mask=k0 + offs_g * 128 < K, other=0.0)
            scale = tl.reshape(tl.reshape(x_scale, (BLOCK_M, GROUPS)) * w_scale[None, :], (BLOCK_M * GROUPS,))
            xt = tl.reshape(q.to(tl.float32) * scale[:, None], (BLOCK_M, BLOCK_K))
        return xt

    @triton.jit
    def _small_linear_kernel(
        x_ptr, w_ptr, out_ptr, w2_ptr, out2_ptr, s_ptr, s2_ptr,
        M, N, N2, K, stride_xb, stride_xm, stride_wb, stride_wn, stride_wk, stride_ob, stride_om, stride_w2n, stride_o2m,
        stride_sn, stride_s2n,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr,
        USE_GDC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        tiles = tl.cdiv(N, BLOCK_N)
        if pid < tiles:
            w_base, o_base, n_cols, swn, swk = w_ptr + b * stride_wb, out_ptr + b * stride_ob, N, stride_wn, stride_wk
            som, col0, s_base, ssn = stride_om, pid * BLOCK_N, s_ptr, stride_sn
        else:  # the second weight's columns (no batch dimension, K contiguous)
            w_base, o_base, n_cols, swn, swk = w2_ptr, out2_ptr, N2, stride_w2n, 1
            som, col0, s_base, ssn = stride_o2m, (pid - tiles) * BLOCK_N, s2_ptr, stride_s2n
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = col0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < n_cols
        x_ptrs = x_ptr + b * stride_xb + offs_m[:, None] * stride_xm + offs_k[None, :]  # [M, K]
        w_ptrs = w_base + offs_n[:, None].to(tl.int64) * swn + offs_k[None, :] * swk  # [N, K]
        s_ptrs = s_base + (col0 // 128) * ssn  # SCALED: BLOCK_N divides 128, one block row
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        k_start = 0
        if USE_GDC:  # pdl.py: the first weight block is requested before waiting for x
            k_mask = offs_k < K
            wt = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            pdl.grid_wait(USE_GDC)
            xt = _load_x(x_ptrs, s_ptrs, 0, K, m_mask, k_mask, BLOCK_M, BLOCK_K, SCALED)
            acc += xt[:, None, :] * wt[None, :, :]
            k_start = BLOCK_K
        for k0 in range(k_start, K, BLOCK_K):
            k_mask = offs_k < K - k0
            xt = _load_x(x_ptrs, s_ptrs, k0, K, m_mask, k_mask, BLOCK_M, BLOCK_K, SCALED)
            wt = tl.load(w_ptrs + k0 * swk, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += xt[:, None, :] * wt[None, :, :]
        out = tl.sum(acc, axis=2)
        o_ptrs = o_base + offs_m[:, None] * som + offs_n[None, :]
        tl.store(o_ptrs, out.to(o_base.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def small_linear_supported(x: torch.Tensor, *weights: torch.Tensor, scaled: bool = False) -> bool:
    """CUDA, inference (no autograd through the kernel), at most MAX_ROWS rows per batch entry,
    one floating dtype for the weights and x in it or in fp32 (read as it is: the products are
    summed in fp32 anyway, so an fp32 input needs no cast launch before), K contiguous in every
    weight (or, for a lone weight, N). `scaled`: the weights are FP8 with 128 x 128 block scales,
    2-D and K-contiguous, read as they are on a GPU with FP8 (x then in bf16, fp16 or fp32)."""
    w_dtype = weights[0].dtype
    if scaled:
        return (
            triton is not None and not torch.is_grad_enabled() and fp8_supported(x.device)
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.shape[-2] <= MAX_ROWS
            and all(w.dtype == FP8 and w.dim() == 2 and w.shape[-1] == x.shape[-1] and w.stride(-1) == 1
                    for w in weights)
        )
    return (
        triton is not None and x.is_cuda and not torch.is_grad_enabled()
        and w_dtype in (torch.bfloat16, torch.float16, torch.float32) and x.dtype in (w_dtype, torch.float32)
        and x.shape[-2] <= MAX_ROWS and all(w.dtype == w_dtype and w.shape[-1] == x.shape[-1] for w in weights)
        and (weights[0].stride(-1) == 1 or (len(weights) == 1 and weights[0].stride(-2) == 1))
        and all(w.stride(-1) == 1 for w in weights[1:])
    )


def _launch(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, scales: list[torch.Tensor] | None = None,
            out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """x [B, M, K] with w [B, N, K] (or [N, K] shared by every b); w2 [N2, K] only with B = 1.
    `scales`: the FP8 weights' block scales (w's, then w2's); the outputs are then in out_dtype."""
    bsz, m, k = x.shape
    n, n2 = w.shape[-2], 0 if w2 is None else w2.shape[0]
    out_dtype = out_dtype or w.dtype
    out = x.new_empty(bsz, m, n, dtype=out_dtype)
    out2 = x.new_empty(m, n2, dtype=out_dtype) if w2 is not None else out
    warps, stages = 4, 4
    if scales is not None:
        # FP8: runs of FP8_TILE's elements (whole 128-groups) of as many rows as make its bytes, at
        # most a 128-row block (the rows of a program share their block scales)
        elements, run, warps, stages = FP8_TILE
        block_k = max(128, min(run, triton.next_power_of_2(k)))
        block_n = min(128, max(1, elements // block_k))
    elif w.stride(-1) == 1:
        # 1,024-element (2 KB) runs of two weight rows per K step; shorter rows take more of them
        block_k = min(1024, triton.next_power_of_2(k))
        block_n = max(2, 2048 // block_k)
    else:  # a [K, N] weight read as [N, K] (MLA's W^UK): runs along N instead
        block_n = min(64, triton.next_power_of_2(n))
        block_k = max(1, 2048 // block_n)
    grid = (triton.cdiv(n, block_n) + triton.cdiv(n2, block_n), bsz)
    w_other = w if w2 is None else w2
    s, s2 = (out, out) if scales is None else (scales[0], scales[-1])
    _small_linear_kernel[grid](
        x, w, out, w_other, out2, s, s2, m, n, n2, k,
        x.stride(0), x.stride(1), w.stride(0) if w.dim() == 3 else 0, w.stride(-2), w.stride(-1),
        out.stride(0), out.stride(1),
        w_other.stride(0), out2.stride(0), s.stride(0), s2.stride(0),
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, SCALED=scales is not None,
        num_warps=warps, num_stages=stages, **pdl.options(x))
    return [out] if w2 is None else [out, out2]


if triton is not None:
    # opaque to torch.compile, as the MoE kernels: the launch is not traced
    @torch.library.custom_op("dsv2::small_linear", mutates_args=())
    def _small_linear_op(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None) -> list[torch.Tensor]:
        return _launch(x, w, w2)

    @_small_linear_op.register_fake
    def _(x, w, w2):
        outs = [x.new_empty(x.shape[0], x.shape[1], w.shape[-2], dtype=w.dtype)]
        return outs if w2 is None else outs + [x.new_empty(x.shape[1], w2.shape[0], dtype=w.dtype)]

    @torch.library.custom_op("dsv2::small_linear_fp8", mutates_args=())
    def _small_linear_fp8_op(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, w2: torch.Tensor | None,
                             s2: torch.Tensor | None, out_dtype: torch.dtype) -> list[torch.Tensor]:
        return _launch(x, w, w2, [s] if w2 is None else [s, s2], out_dtype)

    @_small_linear_fp8_op.register_fake
    def _(x, w, s, w2, s2, out_dtype):
        outs = [x.new_empty(x.shape[0], x.shape[1], w.shape[-2], dtype=out_dtype)]
        return outs if w2 is None else outs + [x.new_empty(x.shape[1], w2.shape[0], dtype=out_dtype)]


def small_linear(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[x @ w^T] (and x @ w2^T with it, same input) for x [..., K] of at most MAX_ROWS rows, in one
    launch on CUDA; F.linear where the kernel does not apply (CPU, training, more rows)."""
    weights = (w,) if w2 is None else (w, w2)
    rows = x.reshape(1, -1, x.shape[-1])
    if not small_linear_supported(rows, *weights):
        return [F.linear(x, wi) for wi in weights]
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    outs = (_small_linear_op if torch.compiler.is_compiling() else _launch)(rows, w, w2)
    return [o.view(*x.shape[:-1], o.shape[-1]) for o in outs]


def batched_small_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, M, K] @ w[b]^T for w [B, N, K] -> [B, M, N] in w's dtype: MLA's per-head W^UV (of
    the fp32 attention output), and W^UK read transposed in place ([H, nope, r] storage as [H, r, nope])."""
    if not small_linear_supported(x, w) or w.dim() != 3:
        return torch.matmul(x.to(w.dtype), w.transpose(-1, -2))
    if x.stride(-1) != 1:
        x = x.contiguous()
    return (_small_linear_op if torch.compiler.is_compiling() else _launch)(x, w, None)[0]


def small_linear_fp8(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor],
                     out_dtype: torch.dtype) -> list[torch.Tensor]:
    """small_linear for one or two FP8 weights with their block scales (small_linear_supported(...,
    scaled=True) holds): the weights are read as FP8 and scaled in the kernel, so a decode step
    streams half the bytes of bf16."""
    rows = x.reshape(1, -1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    w2, s2 = (weights[1], scales[1]) if len(weights) == 2 else (None, None)
    if torch.compiler.is_compiling():
        outs = _small_linear_fp8_op(rows, weights[0], scales[0], w2, s2, out_dtype)
    else:
        outs = _launch(rows, weights[0], w2, list(scales), out_dtype)
    return [o.view(*x.shape[:-1], o.shape[-1]) for o in outs]


def linears(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """[layer(x) for layer in layers] (one or two layers sharing x): in one launch of the kernel
    where it applies (a few rows, no biases; nn.Linear, or FP8 linears with their block scales
    read in the kernel), by the layers themselves otherwise, so training and prefill run exactly the modules."""
    weights = [layer.weight for layer in layers]
    # `fusable = False`: a layer whose forward does more than its matmul (engine/tensor_parallel.py)
    if all(layer.bias is None and getattr(layer, "fusable", True) for layer in layers):
        rows = x.reshape(1, -1, x.shape[-1])
        scales = [getattr(layer, "weight_scale_inv", None) for layer in layers]
        if all(s is not None for s in scales):
            if small_linear_supported(rows, *weights, scaled=True):
                return small_linear_fp8(x, weights, scales, layers[0].act_dtype)
        elif all(s is None for s in scales) and small_linear_supported(rows, *weights):
            return small_linear(x, *weights)
    return [layer(x) for layer in layers]

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

from . import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use F.linear
    triton = None

MAX_ROWS = 4  # from 4 rows on, cuBLAS's tensor-core tiles are as fast (bench/RESULTS.md)


if triton is not None:

    @triton.jit
    def _small_linear_kernel(
        x_ptr, w_ptr, out_ptr, w2_ptr, out2_ptr,
        M, N, N2, K, stride_xb, stride_xm, stride_wb, stride_wn, stride_wk, stride_ob, stride_om, stride_w2n, stride_o2m,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        tiles = tl.cdiv(N, BLOCK_N)
        if pid < tiles:
            w_base, o_base, n_cols, swn, swk = w_ptr + b * stride_wb, out_ptr + b * stride_ob, N, stride_wn, stride_wk
            som, col0 = stride_om, pid * BLOCK_N
        else:  # the second weight's columns (no batch dimension, K contiguous)
            w_base, o_base, n_cols, swn, swk = w2_ptr, out2_ptr, N2, stride_w2n, 1
            som, col0 = stride_o2m, (pid - tiles) * BLOCK_N
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = col0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < n_cols
        x_ptrs = x_ptr + b * stride_xb + offs_m[:, None] * stride_xm + offs_k[None, :]  # [M, K]
        w_ptrs = w_base + offs_n[:, None].to(tl.int64) * swn + offs_k[None, :] * swk  # [N, K]
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        k_start = 0
        if USE_GDC:  # pdl.py: the first weight block is requested before waiting for x
            wt = tl.load(w_ptrs, mask=n_mask[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
            pdl.grid_wait(USE_GDC)
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
            acc += xt[:, None, :] * wt[None, :, :]
            k_start = BLOCK_K
        for k0 in range(k_start, K, BLOCK_K):
            k_mask = offs_k < K - k0
            xt = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            wt = tl.load(w_ptrs + k0 * swk, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += xt[:, None, :] * wt[None, :, :]
        out = tl.sum(acc, axis=2)
        o_ptrs = o_base + offs_m[:, None] * som + offs_n[None, :]
        tl.store(o_ptrs, out.to(o_base.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def small_linear_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """CUDA, inference (no autograd through the kernel), at most MAX_ROWS rows per batch entry,
    one floating dtype for the weights and x in it or in fp32 (read as it is: the products are
    summed in fp32 anyway, so an fp32 input needs no cast launch before), K contiguous in every
    weight (or, for a lone weight, N)."""
    w_dtype = weights[0].dtype
    return (
        triton is not None and x.is_cuda and not torch.is_grad_enabled()
        and w_dtype in (torch.bfloat16, torch.float16, torch.float32) and x.dtype in (w_dtype, torch.float32)
        and x.shape[-2] <= MAX_ROWS and all(w.dtype == w_dtype and w.shape[-1] == x.shape[-1] for w in weights)
        and (weights[0].stride(-1) == 1 or (len(weights) == 1 and weights[0].stride(-2) == 1))
        and all(w.stride(-1) == 1 for w in weights[1:])
    )


def _launch(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None) -> list[torch.Tensor]:
    """x [B, M, K] with w [B, N, K] (or [N, K] shared by every b); w2 [N2, K] only with B = 1."""
    bsz, m, k = x.shape
    n, n2 = w.shape[-2], 0 if w2 is None else w2.shape[0]
    out = x.new_empty(bsz, m, n, dtype=w.dtype)
    out2 = x.new_empty(m, n2, dtype=w.dtype) if w2 is not None else out
    if w.stride(-1) == 1:
        # 1,024-element (2 KB bf16) runs of two weight rows per K step; shorter rows take more of them
        block_k = min(1024, triton.next_power_of_2(k))
        block_n = max(2, 2048 // block_k)
    else:  # a [K, N] weight read as [N, K] (MLA's W^UK): runs along N instead
        block_n = min(64, triton.next_power_of_2(n))
        block_k = max(1, 2048 // block_n)
    grid = (triton.cdiv(n, block_n) + triton.cdiv(n2, block_n), bsz)
    w_other = w if w2 is None else w2
    _small_linear_kernel[grid](
        x, w, out, w_other, out2, m, n, n2, k,
        x.stride(0), x.stride(1), w.stride(0) if w.dim() == 3 else 0, w.stride(-2), w.stride(-1),
        out.stride(0), out.stride(1),
        w_other.stride(0), out2.stride(0),
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=4,
        **pdl.options(x))
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


def linears(x: torch.Tensor, *layers: nn.Linear) -> list[torch.Tensor]:
    """[layer(x) for layer in layers] (one or two layers sharing x): in one launch of the kernel
    where it applies (a few rows, no biases), by the layers themselves otherwise, so training and
    prefill run exactly the modules."""
    weights = [layer.weight for layer in layers]
    if all(layer.bias is None for layer in layers) and small_linear_supported(x.reshape(1, -1, x.shape[-1]), *weights):
        return small_linear(x, *weights)
    return [layer(x) for layer in layers]

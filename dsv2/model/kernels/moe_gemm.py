"""Grouped GEMM over the routed experts for few rows per expert (the decode regime).

x [M, K] holds the (token, expert) rows sorted by expert; expert e owns rows offsets[e]:offsets[e+1]:
    out[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ w[e]^T              (w [E, N, K])
and the fused SwiGLU form, since gate and up read the same rows:
    out = silu(x @ W_gate[e]^T) * (x @ W_up[e]^T)
With a handful of rows per expert the work is streaming the active experts' weights: each program
owns one expert's BLOCK_N output columns, reads that weight block once per row tile (one tile in
the regime this is for) and skips idle experts without touching their weights. The row ranges are
read on the device and every launch parameter comes from shapes, so a step that calls this never
syncs with the host and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None


def moe_gemm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, fp32: x [M, K], w [E, N, K], offsets [E + 1] -> [M, N] in x.dtype
    (rows past offsets[E] are zero)."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if b > a:
            out[a:b] = x[a:b].float() @ w[e].float().T
    return out.to(x.dtype)


def moe_gemm_swiglu_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                              offsets: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, fp32: silu(x @ W_gate[e]^T) * (x @ W_up[e]^T) per segment, in x.dtype."""
    gate = moe_gemm_reference(x.float(), w_gate, offsets)
    up = moe_gemm_reference(x.float(), w_up, offsets)
    return (F.silu(gate) * up).to(x.dtype)


if triton is not None:

    @triton.jit
    def _moe_gemm_kernel(
        x_ptr, w_ptr, w_up_ptr, out_ptr, offsets_ptr, N, K,
        stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SWIGLU: tl.constexpr, PRECISION: tl.constexpr,
    ):
        e = tl.program_id(0)
        pid_n = tl.program_id(1)
        start = tl.load(offsets_ptr + e).to(tl.int32)
        end = tl.load(offsets_ptr + e + 1).to(tl.int32)
        if end <= start:
            return  # an idle expert: its weights are never read
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        # the weight tile is loaded as [BLOCK_K, BLOCK_N], i.e. w[e]^T, straight from [N, K] storage
        w_off = e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        n_tiles = tl.cdiv(end - start, BLOCK_M)
        for t in range(n_tiles):
            rows = start + t * BLOCK_M + offs_m
            row_mask = rows < end
            x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # dead unless SWIGLU
            for k0 in range(0, K, BLOCK_K):
                k_mask = offs_k < K - k0
                xt = tl.load(x_ptrs + k0 * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                w_mask = k_mask[:, None] & n_mask[None, :]
                wt = tl.load(w_ptr + w_off + k0 * stride_wk, mask=w_mask, other=0.0)
                acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
                if SWIGLU:  # the up projection's tile in the same pass over K: x is read once
                    ut = tl.load(w_up_ptr + w_off + k0 * stride_wk, mask=w_mask, other=0.0)
                    acc_up = tl.dot(xt, ut, acc_up, input_precision=PRECISION)
            if SWIGLU:
                acc = acc * tl.sigmoid(acc) * acc_up
            out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def moe_gemm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these operands: CUDA, bf16 or fp32 throughout, and K and N
    multiples of 16 (tl.dot's smallest tile)."""
    return (
        triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float32)
        and all(w.dtype == x.dtype and w.shape[1] % 16 == 0 and w.shape[2] % 16 == 0 for w in weights)
    )


def _launch(x, w, w_up, offsets, block_m):
    m, k = x.shape
    n_experts, n, _ = w.shape
    assert w.shape[2] == k and offsets.shape == (n_experts + 1,), "x [M, K], w [E, N, K], offsets [E + 1]"
    assert w_up is None or w_up.shape == w.shape, "w_gate and w_up must have the same shape"
    assert x.dtype == w.dtype and (w_up is None or w_up.dtype == w.dtype), \
        "x and the weights must share a dtype"
    assert k % 16 == 0 and n % 16 == 0, f"moe_gemm needs K and N multiples of 16, got K={k}, N={n}"
    out = x.new_empty(m, n)
    if m == 0:
        return out
    if block_m is None:
        # from shapes only (graph capture): twice the mean rows per expert, since routing is
        # uneven, so that most experts fit one row tile; each further tile streams the expert's
        # weight block again. 16 is tl.dot's minimum; past 64 rows per expert the caller takes the
        # CUTLASS grouped GEMM.
        block_m = min(64, max(16, triton.next_power_of_2(2 * m // n_experts)))
    # No autotuning (shapes vary per step and tuning would time launches inside a capture), so one
    # choice aimed at streaming: BLOCK_N 64 gives E x N/64 programs (V2-Lite: 64 x 22), enough to
    # fill every SM even when a single token activates only 6 experts; each K step reads a 256-byte
    # run of every weight row (BLOCK_K 128 bf16 / 64 fp32), 16 KB a tile; 4 stages keep 3 tiles
    # (48 KB) of weights in flight per program, 3 stages of the two SwiGLU tiles 64 KB, which
    # hides HBM latency; the biggest bf16 case (SwiGLU, BLOCK_M 64) takes 144 KB of the H100's 227 KB
    # of shared memory, without register spills (ptxas, sm_90a).
    block_n = min(64, triton.next_power_of_2(n))
    block_k = min(256 // x.element_size(), triton.next_power_of_2(k))
    grid = (n_experts, triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        x, w, w if w_up is None else w_up, out, offsets, n, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SWIGLU=w_up is not None,
        # fp32 gets fp32 dots (not tf32): the fp32 path is the one tests hold to tight bounds
        PRECISION="ieee" if x.dtype == torch.float32 else None,
        num_warps=4, num_stages=3 if w_up is not None else 4)
    return out


if triton is not None:
    # torch.compile sees the kernels as opaque ops (as the engine's decode kernels): it does not trace
    # the launch, and the shape-derived block sizes are computed from concrete shapes
    @torch.library.custom_op("dsv2::moe_gemm", mutates_args=())
    def _moe_gemm_op(x: torch.Tensor, w: torch.Tensor, w_up: torch.Tensor | None, offsets: torch.Tensor,
                     block_m: int | None) -> torch.Tensor:
        return _launch(x, w, w_up, offsets, block_m)

    @_moe_gemm_op.register_fake
    def _(x, w, w_up, offsets, block_m):
        return x.new_empty(x.shape[0], w.shape[1])


def _dispatch(x, w, w_up, offsets, block_m):
    if torch.compiler.is_compiling():
        return _moe_gemm_op(x, w, w_up, offsets, block_m)
    return _launch(x, w, w_up, offsets, block_m)


def moe_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
             block_m: int | None = None) -> torch.Tensor:
    """Triton on CUDA, the reference elsewhere. x [M, K] sorted by expert, w [E, N, K], offsets [E + 1]
    -> [M, N] in x.dtype; rows past offsets[E] are left unwritten by the kernel."""
    if triton is None or not x.is_cuda:
        return moe_gemm_reference(x, w, offsets)
    return _dispatch(x, w, None, offsets, block_m)


def moe_gemm_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, offsets: torch.Tensor,
                    block_m: int | None = None) -> torch.Tensor:
    """silu(x @ W_gate[e]^T) * (x @ W_up[e]^T) per expert segment, in one kernel: both weights are
    streamed in the same K loop over the rows' one read. Same conventions as `moe_gemm`."""
    if triton is None or not x.is_cuda:
        return moe_gemm_swiglu_reference(x, w_gate, w_up, offsets)
    return _dispatch(x, w_gate, w_up, offsets, block_m)

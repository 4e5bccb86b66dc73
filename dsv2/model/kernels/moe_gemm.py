"""Grouped GEMM over the routed experts for few rows per expert (the decode regime).

The (token, expert) rows are sorted by expert; expert e owns sorted rows offsets[e]:offsets[e+1]:
    out[rows of e] = x[rows of e] @ w[e]^T              (w [E, N, K])
and the fused SwiGLU form, since gate and up read the same rows:
    out = silu(x @ W_gate[e]^T) * (x @ W_up[e]^T)
With a handful of rows per expert the work is streaming the active experts' weights: each program
owns one expert's BLOCK_N output columns, reads that weight block once per row tile (one tile in
the regime this is for) and never reads an idle expert's weights. The row ranges are
read on the device and every launch parameter comes from shapes, so a step that calls this never
syncs with the host and can be captured in a CUDA graph.

`fused_experts` is a whole MoE layer's experts in three launches: the (token, expert) assignments
sorted by expert (kernels/moe_route.py), then the SwiGLU GEMM reading each sorted row's token from
x directly, then the down GEMM writing each row, scaled by its gate value, back to its (token, k)
place. The shared experts ride along as further experts that every token takes with weight 1, so
their weights stream in the same launches. One token (batch-1 decode) needs no sort: its top-k
experts are distinct, so its k-th assignment is its expert's only row, and the GEMMs read the
routing's topk_idx as it is (two launches); there the down GEMM also sums the parts and adds the
block's residual (in its last program per column tile), so no launch follows for the sum.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import fp8
from ..fp8 import FP8
from . import fp8_gemm, pdl
from .fp8_gemm import fp8_supported
from .moe_route import moe_align

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None


def fused_experts_reference(x, topk_idx, topk_weight, w_gate, w_up, w_down, shared=None) -> torch.Tensor:
    """Plain PyTorch, fp32, one (token, expert) pair at a time: sum_k g_k FFN_{idx_k}(x) + shared(x)."""
    xf = x.float()
    out = torch.zeros_like(xf)
    for t in range(x.shape[0]):
        for e, g in zip(topk_idx[t].tolist(), topk_weight[t].tolist()):
            h = F.silu(xf[t] @ w_gate[e].float().T) * (xf[t] @ w_up[e].float().T)
            out[t] += g * (h @ w_down[e].float().T)
    if shared is not None:
        sg, su, sd = (w.float() for w in shared)
        out += (F.silu(xf @ sg.T) * (xf @ su.T)) @ sd.T
    return out.to(x.dtype)


if triton is not None:

    @triton.jit
    def _moe_gemm_kernel(
        x_ptr, w_ptr, w_up_ptr, ws_ptr, ws_up_ptr, out_ptr, offsets_ptr, rows_ptr, scale_ptr, idx_ptr,
        tickets_ptr, residual_ptr, sum_ptr, q_ptr, q_up_ptr, qs_ptr, qs_up_ptr, xs_ptr, os_ptr,
        N, K, n_routed, n_experts, x_group, top_k,
        stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
        stride_qe, stride_qn, stride_qk, stride_qse, stride_qsn, stride_qsk, stride_xsm, stride_osm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        SWIGLU: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, DIRECT: tl.constexpr,
        REDUCE: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr, SCALED: tl.constexpr,
        UNROLL: tl.constexpr, X_SCALED: tl.constexpr, OUT_SCALED: tl.constexpr, ROUND_BF16: tl.constexpr,
        USE_GDC: tl.constexpr,
    ):
        # Weights are [E, N, K] with K contiguous; experts past n_routed (the shared ones) come from
        # ws_ptr with their own strides. GATHER: sorted row p reads x[rows[p] // x_group].
        # SCATTER: sorted row p writes, in fp32 and times its gate value, to out[rows[p]], where
        # rows[p] = token * x_group + k and the gate value is scale[token, k] (1 past top_k).
        # program j of axis 0 serves the j-th expert that has rows (the grid has no more of them
        # than there are rows), so a step with few tokens launches no programs for idle experts.
        # DIRECT (one token): no sort; assignment j is row j and its expert's only row, since the
        # top-k experts are distinct: routed expert idx[j] for j < top_k, then the shared ones.
        # REDUCE (with DIRECT and SCATTER): the last of a column tile's x_group programs to finish
        # (counted on tickets[pid_n], which it resets) sums the tile's parts in expert order, adds
        # the residual and writes sum[0, tile]: the same result on every run, and no launch for the sum
        # SCALED: the weights are FP8 and q_ptr / q_up_ptr (qs_ptr / qs_up_ptr for the shared experts)
        # their 128 x 128 block scales [E, N/128, K/128]; each K step (at most 128 deep, inside one
        # block) multiplies its partial product column by column by its block's scale.
        # X_SCALED: x is already e4m3 with its 1 x 128 group scales at xs_ptr ([rows, K/128]), so no
        # K step waits on a quantization. OUT_SCALED (SwiGLU, BLOCK_N 128): the output is stored as
        # e4m3 with one scale per row and 128 columns at os_ptr, ready for the down GEMM's X_SCALED
        # (rounded first to bf16 with ROUND_BF16, as an unquantized h would be stored).
        j = tl.program_id(0)
        pid_n = tl.program_id(1)
        pdl.grid_wait(USE_GDC)  # which experts are busy is the previous kernels' output
        if DIRECT:
            routed = tl.load(idx_ptr + tl.minimum(j, top_k - 1)).to(tl.int32)
            e = tl.where(j < top_k, routed, n_routed + j - top_k)
            start = j
            end = j + 1
        else:
            offs_e = tl.arange(0, BLOCK_E)
            e_mask = offs_e < n_experts
            lo = tl.load(offsets_ptr + offs_e, mask=e_mask, other=0)
            hi = tl.load(offsets_ptr + offs_e + 1, mask=e_mask, other=0)
            busy = hi > lo
            pick = busy & (tl.cumsum(busy.to(tl.int32), 0) == j + 1)
            if tl.sum(pick.to(tl.int32), 0) == 0:
                return  # fewer busy experts than programs
            e = tl.sum(tl.where(pick, offs_e, 0), 0)
            start = tl.sum(tl.where(pick, lo, 0), 0).to(tl.int32)
            end = tl.sum(tl.where(pick, hi, 0), 0).to(tl.int32)
        if e < n_routed:
            w_base = w_ptr + e.to(tl.int64) * stride_we
            u_base = w_up_ptr + e.to(tl.int64) * stride_we
            stride_n = stride_wn
            q_base = q_ptr + e.to(tl.int64) * stride_qe
            qu_base = q_up_ptr + e.to(tl.int64) * stride_qe
            q_n, q_k = stride_qn, stride_qk
        else:
            w_base = ws_ptr + (e - n_routed).to(tl.int64) * stride_se
            u_base = ws_up_ptr + (e - n_routed).to(tl.int64) * stride_se
            stride_n = stride_sn
            q_base = qs_ptr + (e - n_routed).to(tl.int64) * stride_qse
            qu_base = qs_up_ptr + (e - n_routed).to(tl.int64) * stride_qse
            q_n, q_k = stride_qsn, stride_qsk
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        # the weight tile is loaded as [BLOCK_K, BLOCK_N], i.e. w[e]^T, straight from [N, K] storage
        w_off = offs_k[:, None] + offs_n[None, :].to(tl.int64) * stride_n
        n_tiles = tl.cdiv(end - start, BLOCK_M)
        for t in range(n_tiles):
            rows = start + t * BLOCK_M + offs_m
            row_mask = rows < end
            if DIRECT:
                assignment = rows
            elif GATHER or SCATTER:
                assignment = tl.load(rows_ptr + rows, mask=row_mask, other=0)
            if GATHER:
                x_rows = assignment // x_group
            else:
                x_rows = rows
            x_ptrs = x_ptr + x_rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # dead unless SWIGLU
            for k_step in range(0, K, BLOCK_K * UNROLL):
                for u in tl.static_range(UNROLL):  # FP8: several 128-deep blocks per step, more bytes in flight
                    k0 = k_step + u * BLOCK_K
                    k_mask = offs_k < K - k0
                    xt = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    w_mask = k_mask[:, None] & n_mask[None, :]
                    wt = tl.load(w_base + w_off + k0, mask=w_mask, other=0.0)
                    if X_SCALED:
                        xq = xt
                        xs = tl.load(xs_ptr + x_rows.to(tl.int64) * stride_xsm + k0 // 128,
                                     mask=row_mask & (k0 < K), other=0.0)
                    elif SCALED:  # FP8 x FP8, x rounded per 128-group of each row as kernels/fp8_gemm.py does
                        xq, xs = fp8_gemm.quant_groups(xt.to(tl.float32))
                    if SCALED:
                        q_off = (offs_n // 128) * q_n + (k0 // 128) * q_k
                        qt = tl.load(q_base + q_off, mask=n_mask & (k0 < K), other=0.0)
                        acc += tl.dot(xq, wt) * (xs[:, None] * qt[None, :])
                    else:
                        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
                    if SWIGLU:  # the up projection's tile in the same pass over K: x is read once
                        ut = tl.load(u_base + w_off + k0, mask=w_mask, other=0.0)
                        if SCALED:
                            qt = tl.load(qu_base + q_off, mask=n_mask & (k0 < K), other=0.0)
                            acc_up += tl.dot(xq, ut) * (xs[:, None] * qt[None, :])
                        else:
                            acc_up = tl.dot(xt, ut, acc_up, input_precision=PRECISION)
            if SWIGLU:
                acc = acc * tl.sigmoid(acc) * acc_up
            if SCATTER:
                token = assignment // x_group
                k = assignment % x_group
                g = tl.load(scale_ptr + token * top_k + k, mask=row_mask & (k < top_k), other=1.0)
                out_ptrs = out_ptr + assignment[:, None].to(tl.int64) * stride_om + offs_n[None, :]
                tl.store(out_ptrs, acc * g[:, None], mask=row_mask[:, None] & n_mask[None, :])
                if REDUCE:
                    tl.debug_barrier()  # every thread's part is stored before the ticket releases it
                    if tl.atomic_add(tickets_ptr + pid_n, 1, sem="acq_rel") == x_group - 1:
                        offs_j = tl.arange(0, BLOCK_J)
                        parts = tl.load(out_ptr + offs_j[:, None] * stride_om + offs_n[None, :],
                                        mask=(offs_j < x_group)[:, None] & n_mask[None, :], other=0.0,
                                        cache_modifier=".cg")
                        total = tl.sum(parts, 0) + tl.load(residual_ptr + offs_n, mask=n_mask).to(tl.float32)
                        tl.store(sum_ptr + offs_n, total.to(sum_ptr.dtype.element_ty), mask=n_mask)
                        tl.atomic_xchg(tickets_ptr + pid_n, 0)
            elif OUT_SCALED:
                if ROUND_BF16:
                    acc = acc.to(tl.bfloat16).to(tl.float32)
                hq, hs = fp8_gemm.quant_groups(acc)
                out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_n[None, :]
                tl.store(out_ptrs, hq, mask=row_mask[:, None] & n_mask[None, :])
                tl.store(os_ptr + rows.to(tl.int64) * stride_osm + pid_n, hs, mask=row_mask)
            else:
                out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_n[None, :]
                tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def moe_gemm_supported(x: torch.Tensor, *weights: torch.Tensor, scaled: bool = False) -> bool:
    """Whether the Triton kernel takes these operands: CUDA, bf16 or fp32 throughout, K and N
    multiples of 16 (tl.dot's smallest tile) and K contiguous. `scaled`: the weights are FP8 (with
    128 x 128 block scales) on a GPU with FP8, x in bf16 or fp32."""
    w_dtype = FP8 if scaled else x.dtype
    return (
        triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float32)
        and (not scaled or fp8_supported(x.device))
        and all(w.dtype == w_dtype and w.shape[-2] % 16 == 0 and w.shape[-1] % 16 == 0 and w.stride(-1) == 1
                for w in weights)
    )


def _block_m(rows: int, n_experts: int) -> int:
    # from shapes only (graph capture): twice the mean rows per expert, since routing is uneven,
    # so that most experts fit one row tile; each further tile streams the expert's weight block
    # again. 16 is tl.dot's minimum; past 64 rows per expert the caller takes the CUTLASS grouped GEMM.
    return min(64, max(16, triton.next_power_of_2(2 * rows // n_experts)))


MAX_TILES = 4096
# FP8 weights, per GEMM: (BLOCK_N, 128-deep blocks per K step, warps, stages)
FP8_CONFIG = {"swiglu": (32, 1, 4, 3), "down": (64, 1, 4, 4)}


@functools.cache
def _tickets(device: torch.device) -> torch.Tensor:
    """Per column tile, how many programs of a REDUCE launch have stored their part; each launch
    leaves it at zero. Allocated at a step's first (uncaptured) run, then shared by every layer: the
    launches run one after another on the stream."""
    return torch.zeros(MAX_TILES, dtype=torch.int32, device=device)


def _sums_in_kernel(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """One token with a residual: the down GEMM returns residual + the sum of the experts' parts."""
    return residual is not None and x.shape[0] == 1


def _launch(x, w, w_up, offsets, out, *, shared=None, rows=None, x_group=1, scale=None, top_k=0, idx=None,
            residual=None, total=None, w_scales=None, shared_scales=None, x_scales=None, out_scales=None,
            round_bf16=False):
    """out[M', N] <- the grouped GEMM of x's rows (sorted, or gathered through `rows`) by w [E, N, K]
    (and, past E, `shared` = (w, w_up) stacked as [S, N, K]-strided views). With `idx` (one token's
    topk_idx) instead of `rows` and `offsets`, its assignments are taken in place, unsorted; then
    with `residual` [1, N] the down GEMM also writes total[0] = residual + the sum of its rows.
    `w_scales` (and `shared_scales`): (w's, w_up's) block scales [E, N/128, K/128] of FP8 weights;
    `x_scales`: x is e4m3 with these 1 x 128 scales; `out_scales`: out is written e4m3 with these."""
    n_routed, n, k = w.shape
    ws, ws_up = shared if shared is not None else (w, w_up)
    q, q_up = w_scales if w_scales is not None else (out, None)
    qs, qs_up = shared_scales if shared_scales is not None else (q, q_up)
    q_up, qs_up = q if q_up is None else q_up, qs if qs_up is None else qs_up
    n_experts = n_routed + (ws.shape[0] if shared is not None else 0)
    if idx is not None:  # one token's assignments: its top-k routed experts, then every shared one
        top_k = idx.shape[1]
        assert idx.shape[0] == 1 and x_group == top_k + n_experts - n_routed, "idx [1, top_k] of one token"
    else:
        assert offsets.shape == (n_experts + 1,), "offsets [E + 1]"
    assert x.shape[1] == k and ws.shape[1:] == (n, k), "x [M, K], w [E, N, K]"
    assert w_up is None or w_up.shape == w.shape, "w_gate and w_up must have the same shape"
    assert w.dtype == ws.dtype and (x.dtype == w.dtype or w_scales is not None), "x and the weights must share a dtype"
    assert (x_scales is None and out_scales is None) or w_scales is not None, "FP8 activations need FP8 weights"
    assert k % 16 == 0 and n % 16 == 0, f"moe_gemm needs K and N multiples of 16, got K={k}, N={n}"
    assert x.stride(1) == w.stride(2) == ws.stride(2) == out.stride(1) == 1, "K and N must be contiguous"
    direct = idx is not None
    m = x_group if direct else rows.shape[0] if rows is not None else x.shape[0]
    if m == 0:
        return out
    block_m = _block_m(m, n_experts)
    # No autotuning (shapes vary per step and tuning would time launches inside a capture), so one
    # choice aimed at streaming: (busy experts) x N/BLOCK_N programs, with BLOCK_N 32 for SwiGLU
    # (V2-Lite, one token's 6 routed + 2 shared: 8 x 44, against 8 x 22 = 176 for 132 SMs that left
    # a ragged second round; 34.9 against 36.1 us a layer on an H100, bench/RESULTS.md) and 64 for
    # the down GEMM (8 x 32; 32 or 128 were no faster). Each K step reads a 256-byte run of every
    # weight row (BLOCK_K 128 bf16 / 64 fp32); 4 stages keep 3 tiles of weights in flight per
    # program, 3 stages of the two SwiGLU tiles, which hides HBM latency; the biggest bf16 case
    # (down, BLOCK_M 64: 4 x 32 KB) fits the H100's 227 KB of shared memory.
    block_n = min(32 if w_up is not None else 64, triton.next_power_of_2(n))
    block_k = min(256 // x.element_size(), triton.next_power_of_2(k))
    unroll, warps, stages = 1, 4, 3 if w_up is not None else 4
    if w_scales is not None:
        # FP8 weights: K steps of `unroll` 128-deep blocks (a scale per column and an activation
        # group per row for each); FP8_CONFIG measured by bench/fp8_engine_bench.py --sections tune-decode
        block_n, unroll, warps, stages = FP8_CONFIG["swiglu" if w_up is not None else "down"]
        block_n, block_k = min(block_n, triton.next_power_of_2(n)), min(128, triton.next_power_of_2(k))
        if out_scales is not None:  # a program's columns are one 128-group of the output
            assert n % 128 == 0, "an e4m3 output needs N a multiple of 128"
            block_n = 128
    grid = (min(n_experts, m), triton.cdiv(n, block_n))
    reduce = residual is not None
    assert not reduce or (direct and scale is not None and grid[1] <= MAX_TILES), "REDUCE: one token's down GEMM"
    _moe_gemm_kernel[grid](
        x, w, w if w_up is None else w_up, ws, ws if ws_up is None else ws_up, out,
        idx if direct else offsets, rows if rows is not None else out, out if scale is None else scale,
        idx if direct else out, _tickets(x.device) if reduce else out, residual if reduce else out,
        total if reduce else out, q, q_up, qs, qs_up, out if x_scales is None else x_scales,
        out if out_scales is None else out_scales,
        n, k, n_routed, n_experts, x_group, top_k,
        x.stride(0), w.stride(0), w.stride(1), ws.stride(0), ws.stride(1), out.stride(0),
        *(q.stride() if w_scales is not None else (0, 0, 0)), *(qs.stride() if w_scales is not None else (0, 0, 0)),
        0 if x_scales is None else x_scales.stride(0), 0 if out_scales is None else out_scales.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_E=triton.next_power_of_2(n_experts),
        SWIGLU=w_up is not None,
        GATHER=(rows is not None or direct) and scale is None, SCATTER=scale is not None, DIRECT=direct,
        REDUCE=reduce, BLOCK_J=triton.next_power_of_2(x_group),
        # fp32 gets fp32 dots (not tf32): the fp32 path is the one tests hold to tight bounds
        PRECISION="ieee" if x.dtype == torch.float32 else None, SCALED=w_scales is not None, UNROLL=unroll,
        X_SCALED=x_scales is not None, OUT_SCALED=out_scales is not None, ROUND_BF16=round_bf16,
        num_warps=warps, num_stages=stages, **pdl.options(x))
    return out


def _shared_as_experts(shared, inter_dim, scales=None):
    """The shared MLP (gate/up [S*I, d], down [d, S*I]) as S experts of width I: views, no copies;
    with `scales` (gate's, up's, down's FP8 block scales; I a multiple of 128) theirs too."""
    sg, su, sd = shared
    s = sg.shape[0] // inter_dim
    as_experts = lambda w, rows: w.view(s, rows, w.shape[1])  # noqa: E731
    # down's expert j is columns j*I:(j+1)*I of [d, S*I]: strides (I, S*I, 1)
    as_columns = lambda w, cols: w.as_strided((s, w.shape[0], cols), (cols, w.stride(0), 1))  # noqa: E731
    gate_up, down = (as_experts(sg, inter_dim), as_experts(su, inter_dim)), (as_columns(sd, inter_dim), None)
    if scales is None:
        return gate_up, down, None, None, s
    blocks = inter_dim // fp8.BLOCK
    qg, qu, qd = scales
    return gate_up, down, (as_experts(qg, blocks), as_experts(qu, blocks)), (as_columns(qd, blocks), None), s


def _fused_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
                   residual=None, scales=(None,) * 6):
    n_tokens, top_k = topk_idx.shape
    n_routed, inter_dim, dim = w_gate.shape
    n_shared = 0
    gate_up_shared = down_shared = gate_up_shared_q = down_shared_q = None
    q_gate, q_up, q_down = scales[:3]
    gate_up_q = None if q_gate is None else (q_gate, q_up)
    down_q = None if q_gate is None else (q_down, None)
    if shared_gate is not None:
        gate_up_shared, down_shared, gate_up_shared_q, down_shared_q, n_shared = _shared_as_experts(
            (shared_gate, shared_up, shared_down), inter_dim, None if q_gate is None else scales[3:])
    group = top_k + n_shared
    # one token (batch-1 decode) needs no sort: a launch fewer for each MoE layer
    idx = topk_idx.contiguous() if n_tokens == 1 else None
    rows, offsets = (None, None) if idx is not None else moe_align(topk_idx, n_routed, n_shared)
    if q_gate is not None and inter_dim % fp8.BLOCK == 0:
        # FP8: x quantized once (not in every program's K steps), and h handed over in e4m3
        xq, x_scales = fp8_gemm.act_quant(x)
        h = torch.empty(n_tokens * group, inter_dim, dtype=FP8, device=x.device)
        h_scales = torch.empty(n_tokens * group, inter_dim // fp8.BLOCK, dtype=torch.float32, device=x.device)
    else:
        xq, x_scales, h, h_scales = x, None, x.new_empty(n_tokens * group, inter_dim), None
    _launch(xq, w_gate, w_up, offsets, h, shared=gate_up_shared, rows=rows, x_group=group, idx=idx,
            w_scales=gate_up_q, shared_scales=gate_up_shared_q, x_scales=x_scales, out_scales=h_scales,
            round_bf16=x.dtype == torch.bfloat16)
    out = torch.empty(n_tokens * group, dim, dtype=torch.float32, device=x.device)
    reduce = _sums_in_kernel(x, residual)  # one token: the unsorted (DIRECT) launches above
    total = torch.empty_like(residual) if reduce else None
    _launch(h, w_down, None, offsets, out, shared=down_shared, rows=rows, x_group=group,
            scale=topk_weight.float().contiguous(), top_k=top_k, idx=idx,
            residual=residual.contiguous() if reduce else None, total=total,
            w_scales=down_q, shared_scales=down_shared_q, x_scales=h_scales)
    return total if reduce else out.view(n_tokens, group, dim)


if triton is not None:
    # torch.compile sees the kernels as opaque ops (as the engine's decode kernels): it does not trace
    # the launch, and the shape-derived block sizes are computed from concrete shapes
    @torch.library.custom_op("dsv2::fused_experts", mutates_args=())
    def _fused_experts_op(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                          w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                          shared_gate: torch.Tensor | None, shared_up: torch.Tensor | None,
                          shared_down: torch.Tensor | None, residual: torch.Tensor | None,
                          q_gate: torch.Tensor | None, q_up: torch.Tensor | None, q_down: torch.Tensor | None,
                          qs_gate: torch.Tensor | None, qs_up: torch.Tensor | None,
                          qs_down: torch.Tensor | None) -> torch.Tensor:
        return _fused_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
                              residual, (q_gate, q_up, q_down, qs_gate, qs_up, qs_down))

    @_fused_experts_op.register_fake
    def _(x, topk_idx, topk_weight, w_gate, w_up, w_down, shared_gate, shared_up, shared_down, residual, *scales):
        if _sums_in_kernel(x, residual):
            return torch.empty_like(residual)
        group = topk_idx.shape[1] + (0 if shared_gate is None else shared_gate.shape[0] // w_gate.shape[1])
        return x.new_empty(x.shape[0], group, x.shape[1], dtype=torch.float32)


def fused_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_gate: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor,
                  shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  residual: torch.Tensor | None = None,
                  scales: tuple[torch.Tensor, ...] | None = None,
                  shared_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """A MoE layer's experts for a decode-sized batch, on CUDA: x [N, d], topk_idx [N, K],
    topk_weight [N, K]; routed SwiGLU experts w_gate/w_up [E, I, d], w_down [E, d, I]; `shared` the
    shared experts' (gate [S*I, d], up [S*I, d], down [d, S*I]) -> [N, d] in x.dtype:
    sum_k g_k FFN_{idx_k}(x) + shared(x), plus `residual` [N, d] when given. For one token the down
    GEMM adds the parts and the residual itself; otherwise the per-(token, expert) outputs come
    back in fp32 and are summed here, where a compiled caller fuses the sum into what follows.
    FP8 weights come with `scales` (gate's, up's, down's 128 x 128 block scales, [E, ., .]) and
    `shared_scales` (the shared experts', 2-D; their width I a multiple of 128), read in the kernels."""
    if triton is None or not x.is_cuda:
        if scales is not None:
            w_gate, w_up, w_down = (fp8.dequantize_experts(w, q) for w, q in zip((w_gate, w_up, w_down), scales))
            if shared is not None:
                shared = tuple(fp8.dequantize_experts(w, q) for w, q in zip(shared, shared_scales))
        y = fused_experts_reference(x, topk_idx, topk_weight, w_gate, w_up, w_down, shared)
    else:
        q = (*(scales or (None,) * 3), *(shared_scales or (None,) * 3))
        shared_args = shared if shared is not None else (None,) * 3
        if torch.compiler.is_compiling():
            out = _fused_experts_op(x, topk_idx, topk_weight, w_gate, w_up, w_down, *shared_args, residual, *q)
        else:
            out = _fused_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down, *shared_args, residual, q)
        if _sums_in_kernel(x, residual):
            return out
        y = out.sum(1).to(x.dtype)
    return y if residual is None else residual + y

"""MoE routing for decode-sized batches, in three launches instead of some twenty small ones:

- `moe_route`: the gate's affinities s = softmax(x W_g^T) in fp32, the device-limited choice of
  groups (when the model has them), the top-k experts and their gate values: the logits by many
  programs a token, the rest by one.
- `moe_align`: the (token, k) assignments sorted by expert, as the grouped GEMMs read them, plus
  each expert's row range; the shared experts join as experts E..E+S-1 that every token takes.
  One program sorts them all in registers, so there is no global histogram or atomic to clear.

Both read their sizes from shapes and never sync with the host (CUDA-graph capturable); the plain
PyTorch versions (`Gate` in moe.py for routing, `moe_align_reference`) are the CPU path and what
the tests hold the kernels to.
"""

from __future__ import annotations

import torch

from . import pdl

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def moe_align_reference(topk_idx: torch.Tensor, n_routed: int, n_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_idx [N, K] -> rows [N*(K+S)] int32: assignment t*(K+S)+k in expert order (stable), and
    offsets [E+S+1] int32: expert e's rows are rows[offsets[e]:offsets[e+1]]."""
    n = topk_idx.shape[0]
    shared = torch.arange(n_routed, n_routed + n_shared, device=topk_idx.device).expand(n, n_shared)
    ids = torch.cat([topk_idx.long(), shared], dim=1).flatten()
    rows = ids.argsort(stable=True).int()
    counts = torch.zeros(n_routed + n_shared, dtype=torch.long, device=ids.device).index_add_(0, ids, torch.ones_like(ids))
    return rows, torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()


if triton is not None:

    @triton.jit
    def _align_kernel(idx_ptr, rows_ptr, offsets_ptr, A, n_routed, n_experts,
                      TOP_K: tl.constexpr, GROUP: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr,
                      USE_GDC: tl.constexpr):
        pdl.grid_wait(USE_GDC)
        a = tl.arange(0, BLOCK_A)
        valid = a < A
        token = a // GROUP
        k = a % GROUP
        routed = tl.load(idx_ptr + token * TOP_K + k, mask=valid & (k < TOP_K), other=0).to(tl.int32)
        ids = tl.where(k < TOP_K, routed, n_routed + k - TOP_K)
        ids = tl.where(valid, ids, BLOCK_E - 1)  # padding sorts last, into a bin past every expert
        ends = tl.cumsum(tl.histogram(ids, BLOCK_E), 0)
        e = tl.arange(0, BLOCK_E)
        tl.store(offsets_ptr + 1 + e, ends, mask=e < n_experts)
        tl.store(offsets_ptr + e, tl.zeros([BLOCK_E], dtype=tl.int32), mask=e == 0)
        # unique keys (expert, assignment): sorting them sorts by expert, stably
        order = tl.sort(ids * BLOCK_A + a)
        tl.store(rows_ptr + a, order % BLOCK_A, mask=valid)

    @triton.jit
    def _logits_kernel(x_ptr, w_ptr, logits_ptr, D, E, stride_x, stride_w,
                       BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, USE_GDC: tl.constexpr):
        # one token's affinities for BLOCK_E experts: the gate's weight, read by many programs at
        # once rather than streamed by one, and products of the stored values in fp32, as
        # F.linear(x.float(), W_g.float()) computes them
        t = tl.program_id(0).to(tl.int64)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        e_mask = offs_e < E
        acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        d_start = 0
        if USE_GDC:  # pdl.py: the gate's first weight block is requested before waiting for x
            offs_d = tl.arange(0, BLOCK_D)
            wv = tl.load(w_ptr + offs_e[:, None] * stride_w + offs_d[None, :],
                         mask=e_mask[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
            pdl.grid_wait(USE_GDC)
            xv = tl.load(x_ptr + t * stride_x + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            acc += tl.sum(wv * xv[None, :], axis=1)
            d_start = BLOCK_D
        for d0 in range(d_start, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            xv = tl.load(x_ptr + t * stride_x + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + offs_e[:, None] * stride_w + offs_d[None, :],
                         mask=e_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(wv * xv[None, :], axis=1)
        tl.store(logits_ptr + t * E + offs_e, acc, mask=e_mask)

    @triton.jit
    def _route_kernel(scores_ptr, idx_ptr, weight_ptr, E, scaling,
                      TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, USE_GDC: tl.constexpr):
        pdl.grid_wait(USE_GDC)
        # one token: softmax over its logits (in place: they become the scores), then the choice
        t = tl.program_id(0).to(tl.int64)
        offs_e = tl.arange(0, BLOCK_E)
        e_mask = offs_e < E
        logits = tl.load(scores_ptr + t * E + offs_e, mask=e_mask, other=float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=0))
        p = p / tl.sum(p, axis=0)
        tl.store(scores_ptr + t * E + offs_e, p, mask=e_mask)
        choice = p
        if N_GROUP > 1:
            # device-limited routing: a group's score is its best expert; keep the TOPK_GROUP best
            group = offs_e // (E // N_GROUP)
            offs_g = tl.arange(0, BLOCK_G)
            best = tl.full([BLOCK_G], -1.0, tl.float32)
            for i in tl.static_range(N_GROUP):
                best = tl.where(offs_g == i, tl.max(tl.where(group == i, p, -1.0), axis=0), best)
            keep = tl.zeros([BLOCK_E], dtype=tl.int32)
            for i in tl.static_range(TOPK_GROUP):
                g = tl.argmax(best, axis=0)
                keep = tl.where(group == g, 1, keep)
                best = tl.where(offs_g == g, -2.0, best)
            choice = tl.where(keep != 0, p, 0.0)
        choice = tl.where(e_mask, choice, -1.0)
        offs_k = tl.arange(0, BLOCK_K)
        vals = tl.zeros([BLOCK_K], dtype=tl.float32)
        ids = tl.zeros([BLOCK_K], dtype=tl.int32)
        for i in tl.static_range(TOP_K):
            j = tl.argmax(choice, axis=0)
            vals = tl.where(offs_k == i, tl.max(choice, axis=0), vals)
            ids = tl.where(offs_k == i, j, ids)
            choice = tl.where(offs_e == j, -1.0, choice)
        if NORM:
            vals = vals / (tl.sum(vals, axis=0) + 1e-20)
        else:
            vals = vals * scaling
        k_mask = offs_k < TOP_K
        tl.store(idx_ptr + t * TOP_K + offs_k, ids, mask=k_mask)
        tl.store(weight_ptr + t * TOP_K + offs_k, vals, mask=k_mask)


# one program sorts every assignment of the step in registers; decode-sized batches stay far below
MAX_ALIGN = 8192


def moe_align(topk_idx: torch.Tensor, n_routed: int, n_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton on CUDA (up to MAX_ALIGN assignments), the reference elsewhere. Same contract as
    `moe_align_reference`."""
    n, top_k = topk_idx.shape
    group = top_k + n_shared
    a = n * group
    if triton is None or not topk_idx.is_cuda or a > MAX_ALIGN:
        return moe_align_reference(topk_idx, n_routed, n_shared)
    rows = torch.empty(a, dtype=torch.int32, device=topk_idx.device)
    offsets = torch.empty(n_routed + n_shared + 1, dtype=torch.int32, device=topk_idx.device)
    if a == 0:
        return rows, offsets.zero_()
    block_a = triton.next_power_of_2(a)
    _align_kernel[(1,)](topk_idx.contiguous(), rows, offsets, a, n_routed, n_routed + n_shared,
                        TOP_K=top_k, GROUP=group, BLOCK_A=block_a,
                        BLOCK_E=triton.next_power_of_2(n_routed + n_shared + 1),
                        num_warps=4 if block_a <= 1024 else 8, **pdl.options(topk_idx))
    return rows, offsets


def _route(x: torch.Tensor, weight: torch.Tensor, top_k: int, n_group: int, topk_group: int,
           norm_topk_prob: bool, routed_scaling_factor: float):
    n, d = x.shape
    n_experts = weight.shape[0]
    assert weight.shape[1] == d and x.stride(1) == 1 and weight.stride(1) == 1
    assert n_experts % n_group == 0 and top_k <= n_experts
    scores = torch.empty(n, n_experts, dtype=torch.float32, device=x.device)
    topk_idx = torch.empty(n, top_k, dtype=torch.long, device=x.device)
    topk_weight = torch.empty(n, top_k, dtype=torch.float32, device=x.device)
    if n == 0:
        return scores, topk_idx, topk_weight
    # 4 experts a program: V2-Lite's 256 KB gate weight is read by 16 programs per token
    block_d = min(triton.next_power_of_2(d), 4096)
    _logits_kernel[(n, triton.cdiv(n_experts, 4))](x, weight, scores, d, n_experts, x.stride(0), weight.stride(0),
                                                   BLOCK_E=4, BLOCK_D=block_d, num_warps=4,
                                                   **pdl.options(x))
    _route_kernel[(n,)](
        scores, topk_idx, topk_weight, n_experts, float(routed_scaling_factor), TOP_K=top_k, N_GROUP=n_group,
        TOPK_GROUP=topk_group, NORM=top_k > 1 and norm_topk_prob, BLOCK_E=triton.next_power_of_2(n_experts),
        BLOCK_K=triton.next_power_of_2(top_k), BLOCK_G=triton.next_power_of_2(n_group), num_warps=1,
        **pdl.options(x))
    return scores, topk_idx, topk_weight


if triton is not None:
    # an opaque op under torch.compile, as the other kernels: the launch is not traced
    @torch.library.custom_op("dsv2::moe_route", mutates_args=())
    def _route_op(x: torch.Tensor, weight: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                  norm_topk_prob: bool, routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _route(x, weight, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)

    @_route_op.register_fake
    def _(x, weight, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
        n = x.shape[0]
        return (x.new_empty(n, weight.shape[0], dtype=torch.float32), x.new_empty(n, top_k, dtype=torch.long),
                x.new_empty(n, top_k, dtype=torch.float32))


def moe_route(x: torch.Tensor, weight: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1,
              norm_topk_prob: bool = False, routed_scaling_factor: float = 1.0):
    """x [N, d], the gate's weight [E, d] (CUDA) -> scores [N, E] fp32, topk_idx [N, K] int64,
    topk_weight [N, K] fp32: what `Gate.forward` computes, in one launch."""
    route = _route_op if torch.compiler.is_compiling() else _route
    return route(x, weight, top_k, n_group or 1, topk_group or 1, norm_topk_prob, routed_scaling_factor)

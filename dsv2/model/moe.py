"""DeepSeekMoE: always-on shared experts plus fine-grained routed experts chosen by a softmax gate.

Routed experts are stored stacked ([E, out, in], the per-expert checkpoint tensors stacked) and run
as one grouped matmul over the tokens sorted by expert, so each expert touches only its own tokens.
Decode-sized inference batches take the fused path instead: routing in two Triton launches
(kernels/moe_route.py) and routed plus shared experts in three, two for a single token
(kernels/moe_gemm.py), streaming each active expert's weights once. `Experts.reference` is the per-token, per-expert twin that tests
hold the fast paths to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import fp8
from .kernels.fp8_gemm import fp8_grouped_mm
from .kernels.moe_gemm import fused_experts, moe_gemm_supported
from .kernels.moe_route import MAX_ALIGN, moe_route
from .kernels.small_linear import linears


class MLP(nn.Module):
    """SwiGLU FFN: the dense layers and the shared experts (N_s experts as one MLP of width N_s x I)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linears(x, self.gate_proj, self.up_proj)
        return linears(F.silu(gate) * up, self.down_proj)[0]


@dataclass
class RouterOutput:
    """What the auxiliary balance losses need from one MoE layer, for N = B x S tokens."""

    scores: torch.Tensor  # [N, E] fp32 softmax affinities s_{i,t} over all routed experts
    topk_idx: torch.Tensor  # [N, K] selected experts
    topk_weight: torch.Tensor  # [N, K] fp32 gate values g applied to the expert outputs
    kept: torch.Tensor | None = None  # [N, K] bool: assignments that survived token dropping


@dataclass(frozen=True)
class TokenDropping:
    """Training-time capacity limit (the paper's device-level token dropping).

    Each of `groups` expert groups (one per device) takes at most capacity_factor x its even share
    of the batch's (token, expert) assignments; beyond that the lowest-affinity ones are dropped.
    Sequences marked in `protected` [B] are never dropped (the paper keeps ~10% whole).
    """

    capacity_factor: float
    groups: int
    protected: torch.Tensor | None = None


def capacity_mask(route: RouterOutput, n_experts: int, batch: int, drop: TokenDropping) -> torch.Tensor:
    """[N, K] bool: which assignments each group keeps under its capacity."""
    idx = route.topk_idx
    n, k = idx.shape
    group = idx // (n_experts // drop.groups)
    capacity = math.ceil(drop.capacity_factor * n * k / drop.groups)
    affinity = route.scores.gather(1, idx)  # in [0, 1]
    protected = torch.zeros(n, k, dtype=torch.bool, device=idx.device)
    if drop.protected is not None:
        protected = drop.protected.repeat_interleave(n // batch)[:, None].expand(n, k)
    # sort by group, then protected first, then by affinity, and keep each group's first `capacity`
    key = group.double() * 4 - affinity.double() - 2 * protected.double()
    order = key.flatten().argsort()
    sorted_group = group.flatten()[order]
    starts = torch.searchsorted(sorted_group, torch.arange(drop.groups, device=idx.device))
    rank = torch.arange(n * k, device=idx.device) - starts[sorted_group]
    keep = torch.empty(n * k, dtype=torch.bool, device=idx.device)
    keep[order] = rank < capacity
    return keep.view(n, k) | protected


# bf16 x bf16 products are exact in fp32, so a bf16 GEMM accumulating into fp32 output is the fp32
# GEMM of the same values (up to summation order) on tensor cores: 3% of a V2-Lite prefill step on
# an H100 ran in the fp32 kernel. aten.mm.dtype has no CPU kernel and no backward.
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, d] @ weight [E, d]^T in fp32, whatever the dtype of x and weight."""
    if (_MM_OUT_DTYPE and x.is_cuda and x.dtype == weight.dtype == torch.bfloat16
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return F.linear(x.float(), weight.float())


class Gate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.topk_method = config.topk_method
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))

    def forward(self, x: torch.Tensor, fused: bool = False) -> RouterOutput:
        """x [N, d] -> scores, selection and weights, all routing math in fp32. `fused`: in one
        Triton launch (CUDA inference; the same math, summed in another order)."""
        if fused:
            grouped = self.topk_method == "group_limited_greedy"
            return RouterOutput(*moe_route(x, self.weight, self.top_k, self.n_group if grouped else 1,
                                           self.topk_group if grouped else 1, self.norm_topk_prob,
                                           self.routed_scaling_factor))
        scores = gate_logits(x, self.weight).softmax(dim=-1)
        choice = scores
        if self.topk_method == "group_limited_greedy":
            # device-limited routing: a group's score is its best expert; keep the topk_group best
            groups = scores.unflatten(-1, (self.n_group, -1))
            best_groups = groups.amax(dim=-1).topk(self.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
            choice = groups.masked_fill(~keep[..., None], 0.0).flatten(1)
        topk_weight, topk_idx = choice.topk(self.top_k, dim=-1, sorted=False)
        # the released code renormalizes only when asked and then skips the scaling factor
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            topk_weight = topk_weight * self.routed_scaling_factor
        return RouterOutput(scores=scores, topk_idx=topk_idx, topk_weight=topk_weight)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [M, in] sorted by expert, counts [E] rows per expert, w [E, out, in] -> [M, out]."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        # autocast does not cover the grouped GEMM: cast as it would for a linear layer
        dtype = torch.get_autocast_dtype("cuda")
        x, w = x.to(dtype), w.to(dtype)
    if _has_grouped_mm(x, w):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start:start + n] = x[start:start + n] @ w[e].t()
            start += n
    return out


def _has_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.dtype == w.dtype and grouped_mm_supported(x.device, x.dtype, x.shape[1], w.shape[1])


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Hopper's grouped GEMM needs bf16 and 16-byte aligned rows; elsewhere the segment loop runs
    (which reads the per-expert counts back to the host)."""
    return (
        device.type == "cuda" and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(device)[0] >= 9 and all(d % 8 == 0 for d in dims)
    )


class Experts(nn.Module):
    """N_r routed SwiGLU experts stored stacked, each expert's gate and up rows in one tensor
    (gate_up_proj [E, 2I, d]): a prefill runs both as one grouped GEMM of twice the width, which the
    CUTLASS kernel tiles better (bench/RESULTS.md); gate_proj and up_proj are views of it.
    `to_fp8_` holds them in FP8 with per-expert 128 x 128 block scales (gate_up_proj_scale_inv
    [E, 2 ceil(I/128), ceil(d/128)]: the gate's block rows, then the up's, as the checkpoint blocks
    them apart; down_proj_scale_inv [E, ceil(d/128), ceil(I/128)])."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.inter_dim = inter_dim
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.gate_up_proj_scale_inv = self.down_proj_scale_inv = None

    @property
    def gate_proj(self) -> torch.Tensor:
        return self.gate_up_proj[:, : self.inter_dim]

    @property
    def up_proj(self) -> torch.Tensor:
        return self.gate_up_proj[:, self.inter_dim:]

    @property
    def quantized(self) -> bool:
        return self.gate_up_proj.dtype == fp8.FP8

    def scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FP8 block scales of gate_proj, up_proj and down_proj, as views [E, ., .]."""
        blocks = self.gate_up_proj_scale_inv.shape[1] // 2
        s = self.gate_up_proj_scale_inv
        return s[:, :blocks], s[:, blocks:], self.down_proj_scale_inv

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate_proj, up_proj, down_proj) in float32, whatever the storage."""
        if not self.quantized:
            return self.gate_proj.float(), self.up_proj.float(), self.down_proj.float()
        return tuple(fp8.dequantize_experts(w, s) for w, s in zip((self.gate_proj, self.up_proj, self.down_proj),
                                                                  self.scales()))

    def to_fp8_(self) -> None:
        """Hold the weights in FP8, each expert's gate, up and down quantized on its own (meta: shapes only)."""
        if self.quantized:
            return
        for name, split in (("gate_up_proj", self.inter_dim), ("down_proj", None)):
            w = getattr(self, name)
            halves = [slice(0, split), slice(split, None)] if split else [slice(None)]
            blocks = [fp8.scale_shape(w[0, h].shape) for h in halves]
            q = torch.empty(w.shape, dtype=fp8.FP8, device=w.device)
            scale = torch.empty(w.shape[0], sum(b[0] for b in blocks), blocks[0][1], dtype=torch.float32,
                                device=w.device)
            if not w.is_meta:
                with torch.no_grad():
                    for e in range(w.shape[0]):
                        row = 0
                        for h, b in zip(halves, blocks):
                            q[e, h], scale[e, row:row + b[0]] = fp8.quantize(w[e, h])
                            row += b[0]
            setattr(self, name, nn.Parameter(q, requires_grad=False))
            setattr(self, name + "_scale_inv", nn.Parameter(scale, requires_grad=False))
            del w

    def forward(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weight: torch.Tensor,
        kept: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [N, d], topk_idx/topk_weight [N, K] -> sum_k g_k FFN_{idx_k}(x) [N, d].
        `kept` [N, K] leaves dropped assignments out of the computation altogether."""
        n, k = topk_idx.shape
        if kept is not None:
            return self._dropping(x, topk_idx, topk_weight, kept)
        # every token has exactly k assignments: sort them by expert, run the experts, then sum each
        # token's k outputs by gathering them through the inverse permutation (where each assignment
        # landed in the sorted order): no atomic scatter-adds, and no unsorted copy of the outputs
        flat = topk_idx.flatten()
        order, counts = self._sort(flat)
        y = self._ffn(x[order // k], counts)
        where = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=x.device))
        return (y[where].view(n, k, -1).float() * topk_weight[..., None]).sum(1).to(x.dtype)

    def _sort(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Assignments [M] -> the stable order that groups them by expert, and rows per expert [E].
        The radix sort runs over the key's bits, so the ids sort as the narrowest integer that
        holds them (one pass for uint8 instead of eight for int64); the counts come from where
        each expert starts in the sorted ids (not bincount, which reads its size back to the
        host, nor index_add, whose compiled form sorts again)."""
        key = flat.to(torch.uint8 if self.n_experts <= 256 else torch.int32)
        order = key.argsort(stable=True)
        experts = torch.arange(self.n_experts + 1, device=flat.device)
        return order, torch.searchsorted(flat[order], experts).diff()

    def _ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.quantized:  # FP8 x FP8 on GPUs with FP8, the weights dequantized per expert elsewhere
            split = None if self.inter_dim % fp8.BLOCK == 0 else self.inter_dim
            gate_up = fp8_grouped_mm(xs, self.gate_up_proj, self.gate_up_proj_scale_inv, counts, split)
            gate, up = gate_up.split(self.inter_dim, dim=-1)
            return fp8_grouped_mm(F.silu(gate) * up, self.down_proj, self.down_proj_scale_inv, counts)
        gate, up = grouped_mm(xs, self.gate_up_proj, counts).split(self.inter_dim, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj, counts)

    def _dropping(self, x, topk_idx, topk_weight, kept) -> torch.Tensor:
        """Training with token dropping: only kept assignments are computed, summed by index_add."""
        k = topk_idx.shape[1]
        sel = kept.flatten().nonzero().squeeze(1)
        flat, weight, token = topk_idx.flatten()[sel], topk_weight.flatten()[sel], sel // k
        order, counts = self._sort(flat)
        token = token[order]
        y = self._ffn(x[token], counts)
        y = (y.float() * weight[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, y)

    def reference(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """Obviously right and slow: every (token, chosen expert) pair on its own."""
        out = torch.zeros_like(x)
        gate_proj, up_proj, down_proj = (w.to(x.dtype) for w in self.dequantized())
        for t in range(x.shape[0]):
            for e, g in zip(topk_idx[t].tolist(), topk_weight[t].tolist()):
                h = F.silu(x[t] @ gate_proj[e].t()) * (x[t] @ up_proj[e].t())
                out[t] += g * (h @ down_proj[e].t())
        return out


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.n_shared = config.n_shared_experts or 0
        self.shared_experts = (MLP(config.hidden_size, self.n_shared * config.moe_intermediate_size)
                               if self.n_shared else None)

    def forward(self, x: torch.Tensor, drop: TokenDropping | None = None,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """x [B, S, d] -> (the layer's output, plus `residual` [B, S, d] when given, and the routing).
        `drop` applies only in training (never at inference, as in the paper). The residual is taken
        here because a one-token decode adds it inside the experts' last launch."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        fused = self._fused(flat)
        route = self.gate(flat, fused)
        if fused:
            e, s = self.experts, self.shared_experts
            shared = None if s is None else (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
            scales = shared_scales = None
            if e.quantized:
                scales = e.scales()
                shared_scales = None if s is None else (
                    s.gate_proj.weight_scale_inv, s.up_proj.weight_scale_inv, s.down_proj.weight_scale_inv)
            y = fused_experts(flat, route.topk_idx, route.topk_weight, e.gate_proj, e.up_proj, e.down_proj, shared,
                              None if residual is None else residual.reshape(flat.shape), scales, shared_scales)
            return y.view(shape), route
        if drop is not None and self.training:
            route.kept = capacity_mask(route, self.gate.n_experts, shape[0], drop)
        y = self.experts(flat, route.topk_idx, route.topk_weight, route.kept).view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return (y if residual is None else residual + y), route

    # Decode steps (a few rows per expert) are bound by streaming the active experts' weights, which
    # the CUTLASS grouped GEMM, tiled for large M, does at ~57% of HBM bandwidth on an H100; the
    # Triton kernels read each active expert's weights once per row tile of up to 64 rows and skip
    # the routing's dozen small launches. Measured on an H100 (V2-Lite, bench/RESULTS.md): the
    # Triton GEMM wins at batch 1-64 (up to ~6 rows per expert) and loses at batch 256 (~24 rows per
    # expert), so the switch sits at 16. Shapes alone decide, so a captured step always takes the
    # same path. Inference only: the kernels have no backward; under autocast the weights are fp32.
    fused_max_rows_per_expert = 16

    def _fused(self, flat: torch.Tensor) -> bool:
        e, s = self.experts, self.shared_experts
        if not getattr(e, "fusable", True):  # a wrapper (train/expert_parallel.py) that holds some experts only
            return False
        weights = [e.gate_proj, e.up_proj, e.down_proj] + (
            [] if s is None else [s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight])
        k = self.gate.top_k
        # FP8: the kernels read the shared experts' scales as per-expert views, whole blocks each
        scaled = e.quantized and (s is None or (e.inter_dim % fp8.BLOCK == 0
                                                and all(hasattr(m, "weight_scale_inv") for m in s.children())))
        if e.quantized and not scaled:
            return False
        return (
            moe_gemm_supported(flat, *weights, scaled=scaled)
            and flat.shape[0] * k <= self.fused_max_rows_per_expert * e.n_experts
            and flat.shape[0] * (k + self.n_shared) <= MAX_ALIGN
            and not (torch.is_grad_enabled() and (flat.requires_grad or any(w.requires_grad for w in weights)))
            and not torch.is_autocast_enabled("cuda")
        )


"""Expert parallelism: a MoE layer's routed experts split over the ranks of an EP group.

With EP over G ranks each rank holds E/G consecutive experts (rank g: experts g*E/G .. (g+1)*E/G - 1)
and computes, for the tokens of every rank in its group, only those. One forward of a layer:

1. each rank sorts its (token, expert) assignments by expert, which groups them by the rank that
   holds the expert, and tells every rank how many rows it will send it (an all-to-all of counts);
2. the token rows go to their experts' ranks in one all-to-all, with their local expert ids;
3. each rank runs its experts over what it received with the grouped GEMM the single-process layer
   uses (`Experts._ffn`, unchanged);
4. the outputs return by the reverse all-to-all, and each token sums its k outputs by its gate
   values as `Experts.forward` does.

Both all-to-alls carry gradients (torch.distributed.nn.functional), so the backward runs the same
exchange in reverse. `ExpertParallel` takes the place of a layer's `Experts` with the same call;
the model's code does not change. Dropped assignments (training's token dropping) are never sent.
With `n_group` equal to the EP size, group-limited routing makes a token visit at most `topk_group`
ranks: the paper's device-limited routing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from ..model.moe import Experts


class ExpertParallel(nn.Module):
    """`experts`' share of this rank of `group` (its parameters sliced out), called as Experts is.
    The share is the submodule `part{index}`: its parameters' names say which experts they are, so
    each EP rank's are its own in a checkpoint (`checkpoint.export` joins them)."""

    fusable = False  # the fused decode kernels see one rank's experts only

    def __init__(self, experts: Experts, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group
        self.size = dist.get_world_size(group)
        self.index = dist.get_rank(group)
        if experts.n_experts % self.size:
            raise ValueError(f"{experts.n_experts} routed experts do not split over {self.size} expert-parallel ranks")
        self.n_experts = experts.n_experts
        per = experts.n_experts // self.size
        lo = self.index * per
        dim, inter = experts.down_proj.shape[1], experts.inter_dim
        with torch.device("meta"):
            local = Experts(per, dim, inter)
        local.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[lo:lo + per].clone())
        local.down_proj = nn.Parameter(experts.down_proj.detach()[lo:lo + per].clone())
        self.add_module(f"part{self.index}", local)

    @property
    def local(self) -> Experts:
        return getattr(self, f"part{self.index}")

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                kept: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, d], topk_idx / topk_weight [N, K] over all E experts -> sum_k g_k FFN_{idx_k}(x) [N, d]."""
        n, k = topk_idx.shape
        per = self.local.n_experts
        assignment = (torch.arange(n * k, device=x.device) if kept is None
                      else kept.flatten().nonzero().squeeze(1))
        expert = topk_idx.flatten()[assignment]
        order = expert.argsort(stable=True)  # by expert, hence by the rank that holds it
        assignment, expert = assignment[order], expert[order]
        owner = expert // per
        send_counts = torch.bincount(owner, minlength=self.size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        rows = x[assignment // k]
        received = all_to_all_single(rows.new_empty(sum(recv), rows.shape[1]), rows, recv, send, group=self.group)
        local_expert = expert - owner * per
        received_expert = local_expert.new_empty(sum(recv))
        dist.all_to_all_single(received_expert, local_expert, recv, send, group=self.group)
        # the received rows by local expert for the grouped GEMM, and back to arrival order after it
        by_expert = received_expert.argsort(stable=True)
        counts = torch.bincount(received_expert, minlength=per)
        y = self.local._ffn(received[by_expert], counts)
        y = y[torch.empty_like(by_expert).scatter_(0, by_expert, torch.arange(len(by_expert), device=x.device))]
        returned = all_to_all_single(y.new_empty(sum(send), y.shape[1]), y, send, recv, group=self.group)
        out = x.new_zeros(n * k, x.shape[1]).index_copy(0, assignment, returned.to(x.dtype))
        return (out.view(n, k, -1).float() * topk_weight[..., None]).sum(1).to(x.dtype)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Every MoE layer's routed experts split over `group` (default: every rank), in place."""
    for block in model.layers:
        if block.is_moe:
            block.mlp.experts = ExpertParallel(block.mlp.experts, group)
    return model

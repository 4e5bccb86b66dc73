"""The paper's training objective: next-token cross-entropy plus three balance losses per MoE layer.

With T tokens, N' routed experts, K' chosen per token, D device groups E_1..E_D and a device limit
M (tokens reach at most M groups), for one MoE layer:
    f_i  = N'/(K'T) sum_t 1(token t picks i)          P_i  = (1/T) sum_t s_{i,t}
    L_ExpBal  = a1 sum_i f_i P_i
    L_DevBal  = a2 sum_d f'_d P'_d    f'_d = mean_{j in E_d} f_j,   P'_d = sum_{j in E_d} P_j
    L_CommBal = a3 sum_d f''_d P''_d  f''_d = D/(M T) sum_t 1(t sent to d),  P''_d = P'_d
f counts are constants; gradients reach the gate through P. T is one sequence when the config's
seq_aux is set (the released models), the losses then averaged over the batch; else the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import RouterOutput


@dataclass(frozen=True)
class BalanceConfig:
    expert_alpha: float = 0.003  # a1
    device_alpha: float = 0.05  # a2
    comm_alpha: float = 0.02  # a3
    groups: int = 1  # D: device groups the routed experts are split into
    device_limit: int = 1  # M: groups a token may reach
    per_sequence: bool = True  # T = one sequence (seq_aux) rather than the batch


def balance_losses(route: RouterOutput, batch: int, n_experts: int, top_k: int,
                   cfg: BalanceConfig) -> dict[str, torch.Tensor]:
    """The three weighted losses of one MoE layer: {"expert": ..., "device": ..., "comm": ...}."""
    scores = route.scores  # [N, E] fp32
    rows = batch if cfg.per_sequence else 1
    scores = scores.view(rows, -1, n_experts)  # [R, T, E]
    t = scores.shape[1]
    idx = route.topk_idx.view(rows, t * top_k)
    counts = torch.zeros(rows, n_experts, device=idx.device).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float))
    f = counts * n_experts / (top_k * t)  # [R, E]
    p = scores.mean(1)  # [R, E]
    out = {"expert": cfg.expert_alpha * (f * p).sum(-1).mean()}
    d = cfg.groups
    f_dev = f.view(rows, d, -1).mean(-1)  # [R, D]
    p_dev = p.view(rows, d, -1).sum(-1)
    out["device"] = cfg.device_alpha * (f_dev * p_dev).sum(-1).mean()
    group = route.topk_idx.view(rows, t, top_k) // (n_experts // d)
    reached = F.one_hot(group, d).amax(2).float()  # [R, T, D]: token t sent to group d
    f_comm = reached.sum(1) * d / (cfg.device_limit * t)
    out["comm"] = cfg.comm_alpha * (f_comm * p_dev).sum(-1).mean()
    return out


def training_loss(logits: torch.Tensor, targets: torch.Tensor, routes: list[RouterOutput], n_experts: int,
                  top_k: int, cfg: BalanceConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE + the balance losses summed over MoE layers; returns (loss, parts detached)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    parts = {"ce": ce}
    total = ce
    batch = targets.shape[0]
    for route in routes:
        for name, value in balance_losses(route, batch, n_experts, top_k, cfg).items():
            parts[name] = parts.get(name, 0.0) + value
            total = total + value
    return total, {k: v.detach() for k, v in parts.items()}

import math

import pytest
import torch

from dsv2.model import RouterOutput
from dsv2.model.moe import TokenDropping, capacity_mask
from dsv2.train.losses import BalanceConfig, balance_losses, training_loss
from dsv2.train.schedule import batch_size, learning_rate

from .numerics import tol


def _route(scores, idx):
    scores = torch.tensor(scores, dtype=torch.float32)
    idx = torch.tensor(idx)
    return RouterOutput(scores, idx, scores.gather(1, idx))


def test_balance_losses_hand_computed():
    # T = 2 tokens, N' = 4 experts, K' = 2, D = 2 groups {0,1} {2,3}, M = 1
    route = _route([[0.4, 0.3, 0.2, 0.1],
                    [0.1, 0.2, 0.3, 0.4]], [[0, 1], [3, 0]])
    cfg = BalanceConfig(expert_alpha=1.0, device_alpha=1.0, comm_alpha=1.0, groups=2, device_limit=1)
    out = balance_losses(route, batch=1, n_experts=4, top_k=2, cfg=cfg)
    # f_i = N'/(K'T) * count_i = 4/4 * (2, 1, 0, 1); P = (0.25, 0.25, 0.25, 0.25)
    assert out["expert"].item() == pytest.approx(2 * .25 + 1 * .25 + 0 + 1 * .25)
    # f'_d = mean over group: (1.5, 0.5); P'_d = (0.5, 0.5)
    assert out["device"].item() == pytest.approx(1.5 * .5 + .5 * .5)
    # token 1 reaches group 0; token 2 reaches groups 0 and 1: f''_d = D/(M T) * (2, 1) = (2, 1)
    assert out["comm"].item() == pytest.approx(2 * .5 + 1 * .5)


def test_balance_losses_match_a_loop_transcription():
    torch.manual_seed(0)
    b, t, e, k, d, m = 3, 7, 8, 2, 4, 2
    scores = torch.randn(b * t, e).softmax(-1)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(b * t)])
    route = RouterOutput(scores, idx, scores.gather(1, idx))
    cfg = BalanceConfig(0.003, 0.05, 0.02, groups=d, device_limit=m)
    out = balance_losses(route, b, e, k, cfg)
    groups = [list(range(g * e // d, (g + 1) * e // d)) for g in range(d)]
    want = {"expert": 0.0, "device": 0.0, "comm": 0.0}
    for s in range(b):  # per sequence (seq_aux), then the batch mean
        rows = range(s * t, (s + 1) * t)
        f = [e / (k * t) * sum(i in idx[r].tolist() for r in rows) for i in range(e)]
        p = [sum(scores[r, i].item() for r in rows) / t for i in range(e)]
        want["expert"] += 0.003 * sum(fi * pi for fi, pi in zip(f, p)) / b
        for g in groups:
            f_dev = sum(f[j] for j in g) / len(g)
            p_dev = sum(p[j] for j in g)
            sent = sum(any(j in g for j in idx[r].tolist()) for r in rows)
            want["device"] += 0.05 * f_dev * p_dev / b
            want["comm"] += 0.02 * d / (m * t) * sent * p_dev / b
    for name in want:
        assert out[name].item() == pytest.approx(want[name], rel=tol(torch.float32, 2**7))


def test_balanced_routing_gives_the_minimum():
    # perfectly uniform scores and loads: sum f_i P_i = 1 for the expert loss
    e, k, t = 4, 2, 4
    scores = torch.full((t, e), 1 / e)
    idx = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    out = balance_losses(RouterOutput(scores, idx, scores[:, :k]), 1, e, k, BalanceConfig(1, 1, 1, 2, 2))
    assert out["expert"].item() == pytest.approx(1.0)
    assert out["device"].item() == pytest.approx(1.0)


def test_training_loss_gradients_reach_the_gate_through_p():
    scores_logits = torch.randn(6, 4, requires_grad=True)
    scores = scores_logits.softmax(-1)
    idx = scores.topk(2, -1).indices
    route = RouterOutput(scores, idx, scores.gather(1, idx))
    logits = torch.randn(1, 6, 10, requires_grad=True)
    loss, parts = training_loss(logits, torch.randint(0, 10, (1, 6)), [route], 4, 2, BalanceConfig())
    loss.backward()
    assert scores_logits.grad.abs().sum() > 0
    assert set(parts) == {"ce", "expert", "device", "comm"}
    assert loss.item() == pytest.approx(sum(v.item() for v in parts.values()))


def test_learning_rate_schedule():
    kw = dict(peak=4.2e-4, warmup_steps=2000, total_tokens=1000)
    assert learning_rate(0, 0, **kw) == pytest.approx(4.2e-4 / 2000)
    assert learning_rate(999, 10, **kw) == pytest.approx(4.2e-4 / 2)
    assert learning_rate(1999, 100, **kw) == pytest.approx(4.2e-4)
    assert learning_rate(5000, 599, **kw) == pytest.approx(4.2e-4)
    assert learning_rate(5000, 600, **kw) == pytest.approx(4.2e-4 * 0.316)
    assert learning_rate(5000, 899, **kw) == pytest.approx(4.2e-4 * 0.316)
    assert learning_rate(5000, 900, **kw) == pytest.approx(4.2e-4 * 0.316 ** 2)


def test_batch_size_ramp():
    # DeepSeek-V2: 2,304 -> 9,216 sequences over the first 225B tokens
    assert batch_size(0, 2304, 9216, 225_000_000_000) == 2304
    assert batch_size(112_500_000_000, 2304, 9216, 225_000_000_000) == 5760
    assert batch_size(300_000_000_000, 2304, 9216, 225_000_000_000) == 9216
    assert batch_size(50, 8, 32, 100, multiple=8) == 16


def test_capacity_mask_respects_capacity_and_protection():
    torch.manual_seed(1)
    n, e, k, groups, batch = 64, 8, 2, 4, 4
    scores = torch.randn(n, e).softmax(-1)
    scores[:, :2] += 1.0  # everyone prefers group 0: it must overflow
    scores = scores / scores.sum(-1, keepdim=True)
    idx = scores.topk(k, -1).indices
    route = RouterOutput(scores, idx, scores.gather(1, idx))
    kept = capacity_mask(route, e, batch, TokenDropping(1.0, groups))
    cap = math.ceil(1.0 * n * k / groups)
    group = idx // (e // groups)
    for g in range(groups):
        assert int((kept & (group == g)).sum()) <= cap
    assert int((kept & (group == 0)).sum()) == cap  # the full group is cut exactly to capacity
    # the dropped ones in group 0 have the lowest affinity there
    aff = scores.gather(1, idx)
    in0 = group == 0
    assert aff[in0 & kept].min() >= aff[in0 & ~kept].max()
    protected = torch.tensor([True, False, False, False])
    kept = capacity_mask(route, e, batch, TokenDropping(1.0, groups, protected))
    assert kept[: n // batch].all()  # the protected sequence keeps every assignment

"""Logits against transformers' DeepseekV2 on the same random weights (fp32, CPU), and the fast
paths against their obviously-right twins."""

import pytest
import torch

from dsv2.model import Experts, Gate
from dsv2.model.moe import gate_logits, grouped_mm

from .conftest import PARITY_CONFIGS, hf_model, random_model, tiny_config
from .numerics import MODEL_ULPS, assert_close, tol


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    config = tiny_config(**PARITY_CONFIGS[name])
    model = random_model(config, seed=1)
    hf = hf_model(model, tmp_path)
    tokens = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.abs().max() > 1  # not a degenerate model
    assert_close(ours, theirs, MODEL_ULPS)


def test_padded_batch_matches_transformers(tmp_path):
    config = tiny_config(**PARITY_CONFIGS["qlora-grouplimited-scaled-1dense-yarn"])
    model = random_model(config, seed=3)
    hf = hf_model(model, tmp_path)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(2, config.vocab_size, (3, 48), generator=g)
    mask = torch.ones(3, 48, dtype=torch.long)
    mask[0, :20] = 0  # left padding
    mask[1, 40:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
        theirs = hf(tokens, attention_mask=mask, position_ids=positions).logits
        alone = model(tokens[0:1, 20:])
    real = mask.bool()
    assert_close(ours[real], theirs[real], MODEL_ULPS)
    assert_close(ours[0, 20:], alone[0], MODEL_ULPS)  # padding changes nothing for real tokens
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("name", ["qlora-grouplimited-scaled-1dense-yarn", "noqlora-greedy-0dense"])
def test_absorbed_attention_equals_expanded(name):
    model = random_model(tiny_config(**PARITY_CONFIGS[name]), seed=5)
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert_close(model(tokens, absorb=True), model(tokens), MODEL_ULPS)


def _experts(seed):
    torch.manual_seed(seed)
    experts = Experts(8, 16, 12)
    for p in experts.parameters():
        p.data.normal_(0, 0.3)
    return experts


def test_grouped_experts_equal_per_expert_reference():
    experts = _experts(0)
    x = torch.randn(37, 16)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(37)])
    idx[:10] = torch.tensor([5, 1, 2])  # an uneven load; expert 7 may go unused
    w = torch.rand(37, 3)
    # one expert layer (sums of 16 and 12 terms, O(1) values) in another order: a few ulps
    assert_close(experts(x, idx, w), experts.reference(x, idx, w), 2**5)


def test_dropped_assignments_are_left_out():
    experts = _experts(1)
    x = torch.randn(20, 16)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(20)])
    w = torch.rand(20, 2)
    kept = torch.rand(20, 2) > 0.3
    assert_close(experts(x, idx, w, kept), experts.reference(x, idx, w * kept), 2**5)


def test_grouped_mm_loop_against_dense():
    x = torch.randn(11, 8)
    w = torch.randn(3, 5, 8)
    counts = torch.tensor([4, 0, 7])
    want = torch.cat([x[:4] @ w[0].t(), x[4:] @ w[2].t()])
    assert_close(grouped_mm(x, w, counts), want, 2**4)  # 8-term dot products, blocked differently


def test_group_limited_gate_stays_inside_chosen_groups():
    config = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    gate = Gate(config)
    gate.weight.data.normal_(0, 1)
    x = torch.randn(200, config.hidden_size)
    out = gate(x)
    groups = out.scores.view(200, 4, 4).amax(-1).topk(2, dim=-1).indices
    chosen_groups = out.topk_idx // 4
    assert all(set(c.tolist()) <= set(g.tolist()) for c, g in zip(chosen_groups, groups))
    picked = out.scores.gather(1, out.topk_idx)
    assert_close(out.topk_weight, picked * config.routed_scaling_factor, 2)


def test_norm_topk_prob_renormalizes_without_scaling():
    config = tiny_config(norm_topk_prob=True, routed_scaling_factor=16.0)
    gate = Gate(config)
    gate.weight.data.normal_(0, 1)
    out = gate(torch.randn(50, config.hidden_size))
    assert_close(out.topk_weight.sum(-1), torch.ones(50), 2**3)


def test_router_outputs_for_aux_losses():
    config = tiny_config()
    model = random_model(config)
    tokens = torch.randint(0, config.vocab_size, (2, 10))
    out = model(tokens, return_router=True)
    n_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    assert len(out.router) == n_moe == 2
    r = out.router[0]
    assert r.scores.shape == (20, config.n_routed_experts) and r.scores.dtype == torch.float32
    assert_close(r.scores.sum(-1), torch.ones(20), 2**4)  # a softmax over 16 experts
    assert r.topk_idx.shape == (20, config.num_experts_per_tok)
    assert torch.equal(out.logits, model(tokens))


def test_gradients_reach_every_parameter():
    config = tiny_config()
    model = random_model(config).train()
    tokens = torch.randint(0, config.vocab_size, (4, 32))
    out = model(tokens, return_router=True)
    loss = out.logits.logsumexp(-1).mean() + sum(r.scores.pow(2).mean() for r in out.router)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


def test_dense_model_without_experts():
    config = tiny_config(n_routed_experts=None)
    model = random_model(config)
    assert not any(layer.is_moe for layer in model.layers)
    assert model(torch.randint(0, 512, (1, 5))).shape == (1, 5, 512)


def test_bf16_forward_close_to_fp32():
    model = random_model(tiny_config(), std=0.05)
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = model(tokens)
        low = model.to(torch.bfloat16)(tokens).float()
    # bf16 rounds weights and activations to 2^-8 each; through the layers that compounds to 0.9-3.3%
    # of the logits over seeds and CPU kernel levels (the scalar `default` level rounds its bf16
    # GEMMs differently from AVX2/AVX-512): 8 ulps of bf16 (6.25%) bounds that, and a gross error
    # (a wrong cast or scale) is of the logits' own size
    assert ((low - ref).norm() / ref.norm()) < 8 * tol(torch.bfloat16, 1)


@pytest.mark.gpu
def test_grouped_mm_cuda_bf16_against_loop():
    torch.manual_seed(0)
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 128, 256, device="cuda", dtype=torch.bfloat16) / 16
    counts = torch.bincount(torch.randint(0, 16, (1000,), device="cuda"), minlength=16)
    counts[3] = 0
    counts[0] += 1000 - counts.sum()
    got = grouped_mm(x, w, counts)
    ref = torch.cat([x[a:b].double() @ w[e].double().t() for e, (a, b) in
                     enumerate(zip([0] + counts.cumsum(0)[:-1].tolist(), counts.cumsum(0).tolist()))])
    assert ((got.double() - ref).norm() / ref.norm()) < tol(torch.bfloat16, 1)  # the output's bf16 rounding


@pytest.mark.gpu
def test_gate_logits_cuda_bf16_are_the_fp32_product():
    """bf16 inputs, fp32 output: within fp32 rounding of the float64 product (bf16 rounding of the
    output would be off by up to 4e-3 of the largest logit), with and without gradients."""
    torch.manual_seed(0)
    x = torch.randn(3000, 2048, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(64, 2048, device="cuda") / 45).bfloat16().requires_grad_()
    ref = x.double() @ w.detach().double().t()
    with torch.no_grad():
        fast = gate_logits(x, w)
    slow = gate_logits(x, w)  # with grad: the fp32 path, which autograd covers
    assert fast.dtype == slow.dtype == torch.float32 and slow.requires_grad
    for got in (fast, slow.detach()):
        assert_close(got, ref, 2**10)  # fp32 accumulation over 2048 terms


@pytest.mark.gpu
def test_cuda_fp32_matches_cpu_fp32():
    model = random_model(tiny_config(hidden_size=128, moe_intermediate_size=64), std=0.1)
    tokens = torch.randint(0, 512, (2, 64))
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        ref = model(tokens)
        got = model.to("cuda")(tokens.cuda()).cpu()
        absorbed = model(tokens.cuda(), absorb=True).cpu()
    assert_close(got, ref, MODEL_ULPS)
    assert_close(absorbed, ref, MODEL_ULPS)


@pytest.mark.gpu
def test_cuda_bf16_no_worse_than_transformers(tmp_path):
    """bf16 with random weights drifts a few % from fp32 for any implementation; ours (grouped
    GEMM experts, fused attention) must drift no more than transformers' does on the same weights."""
    model = random_model(tiny_config(hidden_size=128, moe_intermediate_size=64, num_hidden_layers=6), std=0.05)
    hf = hf_model(model, tmp_path)
    tokens = torch.randint(0, 512, (4, 128))
    with torch.no_grad():
        ref = model(tokens)
        ours = model.to("cuda", torch.bfloat16)(tokens.cuda()).float().cpu()
        absorbed = model(tokens.cuda(), absorb=True).float().cpu()
        theirs = hf.to("cuda", torch.bfloat16)(tokens.cuda()).logits.float().cpu()

    def err(x):
        return ((x - ref).norm() / ref.norm()).item()

    assert err(theirs) < 0.2
    assert err(ours) < 1.25 * err(theirs) and err(absorbed) < 1.25 * err(theirs)


def test_activation_checkpointing_gives_the_same_gradients():
    model = random_model(tiny_config()).train()
    tokens = torch.randint(0, 512, (2, 24))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        out = model(tokens, return_router=True, checkpoint_layers=ckpt)
        (out.logits.logsumexp(-1).mean() + sum(r.scores.pow(2).mean() for r in out.router)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:  # the recomputed forward is the same ops; the backward sums in another order
        assert_close(grads[1][n], grads[0][n], 2**4)

"""FP8 weights on the GPU: each kernel against float64 on fresh random inputs (shapes that are not
multiples of 128 among them), and the engine on an FP8 model against that model's own reference
forward, with CUDA graphs and compilation on."""

from __future__ import annotations

import copy

import pytest
import torch

from dsv2.engine import EngineConfig, LLMEngine
from dsv2.model import fp8
from dsv2.model.fp8_layers import quantize_model_
from dsv2.model.kernels.fp8_gemm import act_quant, act_quant_reference, fp8_grouped_mm, fp8_linear
from dsv2.model.kernels.moe_gemm import fused_experts
from dsv2.model.kernels.small_linear import small_linear_fp8

from .conftest import random_model, run_greedy, tiny_config
from .numerics import assert_greedy
from .test_engine_gpu import assert_decode_graph_matches_eager
from .test_kernels import _experts_case

pytestmark = pytest.mark.gpu


def _fp8_weight(shape, g, scale=1.0):
    """A random weight [*, out, in] at fan-in scale, blocks of different magnitudes, quantized."""
    w = torch.randn(*shape, generator=g) / shape[-1] ** 0.5 * scale
    w = w * torch.logspace(-1, 1, shape[-1])  # column blocks of different magnitudes
    if w.dim() == 2:
        return fp8.quantize(w)
    qs = [fp8.quantize(m) for m in w]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def _rel(got, want):
    return ((got.double().cpu() - want).norm() / want.norm()).item()


def _dequant_acts(q, s, k):
    """act_quant's output as float64: each row's 128-wide groups times their scale."""
    return (q.double() * s.double().repeat_interleave(fp8.BLOCK, 1)[:, :k]).cpu()


def fake_quant(x):
    """x [..., K] rounded to e4m3 per 128-group of each row as every FP8 kernel rounds its
    activations (act_quant_reference), back in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    return _dequant_acts(*act_quant_reference(rows), rows.shape[1]).to(x.dtype).view(x.shape)


@pytest.mark.parametrize("m, k", [(1, 128), (7, 200), (64, 2048), (300, 1408)])
def test_act_quant_kernel_against_reference(m, k):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * torch.logspace(-2, 2, k)
    x[0, :min(k, 128)] = 0  # an all-zero group: scale 1
    q, s = act_quant(x.to("cuda", torch.bfloat16))
    ref_q, ref_s = act_quant_reference(x.bfloat16())
    torch.testing.assert_close(s.cpu(), ref_s, rtol=2 * torch.finfo(torch.float32).eps, atol=0)
    # the kernel divides in fp32 as the reference does; a rare value on a rounding boundary may land one
    # e4m3 step away, which is at most 2^-3 of it
    diff = (q.cpu().float() - ref_q.float()).abs()
    assert (diff <= 2**-3 * ref_q.float().abs() + 1e-12).all()
    assert (diff > 0).float().mean() < 1e-3
    deq = _dequant_acts(q, s, k)
    assert ((deq - x.bfloat16().double()).abs() <= 2**-4 * x.bfloat16().double().abs() + 2**-9 * deq.abs().max()).all()


@pytest.mark.parametrize("m, n, k", [
    (2048, 2048, 2048),  # V2-Lite o_proj over a 2048-token prefill
    (64, 3072, 2048),  # q_proj at decode batch 64
    (77, 300, 200),  # nothing a multiple of 128
    (5, 576, 1536),
    (5, 384, 96),  # K inside one block (the bundled model's q_b_proj)
])
def test_fp8_gemm_against_float64(m, n, k):
    """FP8 x FP8 with 1 x 128 activation and 128 x 128 weight scales = the float64 product of the
    dequantized operands (act_quant's output, checked above), up to fp32 sums and the bf16 output."""
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        q, s = _fp8_weight((n, k), g)
        x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
        with torch.no_grad():
            got = fp8_linear(x, q.cuda(), s.cuda())
        a, a_s = act_quant(x)
        want = _dequant_acts(a, a_s, k) @ fp8.dequantize(q, s, torch.float64).T
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        assert _rel(got, want) < 2**-8, _rel(got, want)  # bf16's rounding of the output


@pytest.mark.parametrize("counts, n, k, split", [
    ([190, 0, 205, 3, 1, 0, 380, 64], 2816, 2048, None),  # V2-Lite's gate_up over a prefill: uneven, idle experts
    ([33, 0, 70, 1], 2048, 1408, None),  # down_proj: K not a multiple of 128
    ([20, 9, 0, 31], 320, 192, 160),  # gate_up with I = 160: the up half's blocks start at row 160
])
def test_fp8_grouped_gemm_against_float64(counts, n, k, split):
    g = torch.Generator().manual_seed(len(counts))
    e = len(counts)
    if split is None:
        q, s = _fp8_weight((e, n, k), g)
    else:  # gate and up quantized apart, their block rows stacked, as Experts.to_fp8_ stores them
        (qg, sg), (qu, su) = _fp8_weight((e, split, k), g), _fp8_weight((e, n - split, k), g)
        q, s = torch.cat([qg, qu], 1), torch.cat([sg, su], 1)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), k, generator=g).to("cuda", torch.bfloat16)
    with torch.no_grad():
        got = fp8_grouped_mm(x, q.cuda(), s.cuda(), counts.cuda(), split)
    a, a_s = act_quant(x)
    acts = _dequant_acts(a, a_s, k)
    want = torch.cat([acts[a0:a1] @ fp8.dequantize_rows(q[i], s[i], split, torch.float64).T
                      for i, (a0, a1) in enumerate(zip([0, *counts.cumsum(0).tolist()[:-1]], counts.cumsum(0).tolist()))])
    assert _rel(got, want) < 2**-8, _rel(got, want)


@pytest.mark.parametrize("m, n, n2, k", [
    (1, 3072, 576, 2048),  # V2-Lite q_proj with kv_a_proj_with_mqa, batch 1
    (4, 2048, 0, 10944),  # the dense down projection: a K tail inside a 128 block
    (3, 300, 77, 200),  # nothing a multiple of 128
    (5, 96, 80, 256),  # the bundled model's q_a_proj with kv_a_proj_with_mqa: N tails only
    (5, 384, 0, 96),  # its q_b_proj: K inside one block
])
def test_small_linear_reads_fp8_weights(m, n, n2, k):
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        weights = [_fp8_weight((rows, k), g) for rows in ((n, n2) if n2 else (n,))]
        x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
        with torch.no_grad():
            got = small_linear_fp8(x, [q.cuda() for q, _ in weights], [s.cuda() for _, s in weights], torch.bfloat16)
        a, a_s = act_quant(x)  # the kernel rounds x as the GEMMs do
        for out, (q, s) in zip(got, weights, strict=True):
            want = _dequant_acts(a, a_s, k) @ fp8.dequantize(q, s, torch.float64).T
            assert out.dtype == torch.bfloat16 and _rel(out, want) < 2**-8, _rel(out, want)


@pytest.mark.parametrize("n, k, n_experts, inter, dim, n_shared, skew", [
    (1, 6, 64, 1408, 2048, 2, 0.0),  # V2-Lite, batch 1 (the residual summed in the down GEMM)
    (64, 6, 64, 1408, 2048, 2, 0.3),  # V2-Lite, batch 64, one hot expert
    (9, 4, 8, 144, 80, 0, 0.5),  # K and N tails inside a block, no shared experts
])
def test_fused_experts_read_fp8_weights(n, k, n_experts, inter, dim, n_shared, skew):
    for seed in range(2):
        x, idx, weight, w_gate, w_up, w_down, shared, _ = _experts_case(
            n, k, n_experts, inter, dim, n_shared, seed, "cpu", torch.float32, skew)
        routed = [fp8_stack(w.nan_to_num()) for w in (w_gate, w_up, w_down)]
        shared_q = None if shared is None else [fp8.quantize(w) for w in shared]
        residual = torch.randn(n, dim).bfloat16()
        cuda = lambda pairs, i: None if pairs is None else tuple(p[i].cuda() for p in pairs)  # noqa: E731
        with torch.no_grad():
            got = fused_experts(x.to("cuda", torch.bfloat16), idx.cuda(), weight.cuda(), *cuda(routed, 0),
                                cuda(shared_q, 0), residual.cuda(), cuda(routed, 1), cuda(shared_q, 1))
        deq = [torch.stack([fp8.dequantize(q[e], s[e], torch.float64) for e in range(n_experts)]) for q, s in routed]
        sdeq = None if shared_q is None else [fp8.dequantize(q, s, torch.float64) for q, s in shared_q]
        want = residual.double() + _fp8_experts_reference(x.bfloat16().double(), idx, weight.double(), deq, sdeq)
        assert got.dtype == torch.bfloat16 and got.shape == (n, dim)
        # h is stored in bf16 between the launches, and a value of h on an e4m3 rounding boundary may
        # round either way there and in float64 here (2^-3 of it): ~1% in all
        assert _rel(got, want) < 2e-2, _rel(got, want)


def _fp8_experts_reference(x, idx, weight, routed, shared):
    """float64 experts of dequantized weights, x and h rounded as the FP8 kernels round activations."""
    def ffn(xq, g, u, d):
        h = torch.nn.functional.silu(xq @ g.T) * (xq @ u.T)
        return fake_quant(h.bfloat16().double()) @ d.T
    xq = fake_quant(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, gv in zip(idx[t].tolist(), weight[t].tolist()):
            out[t] += gv * ffn(xq[t:t + 1], routed[0][e], routed[1][e], routed[2][e])[0]
    if shared is not None:
        out += ffn(xq, *shared)
    return out


def fp8_stack(w):
    qs = [fp8.quantize(m) for m in w]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def _fp8_model(seed, std, dense=False):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores: compute capability 8.9+")
    # widths in whole blocks where the shared experts ride in the fused kernels (I = 128)
    config = tiny_config(vocab_size=300, hidden_size=256, kv_lora_rank=128, q_lora_rank=128, qk_rope_head_dim=32,
                         moe_intermediate_size=128, intermediate_size=384)
    if dense:  # no routing: a token's path does not jump when a rounding moves a near-tie in the gate
        config = tiny_config(**{**config.to_hf(), "first_k_dense_replace": config.num_hidden_layers})
    bf16 = random_model(config, seed=seed, std=std).to("cuda", torch.bfloat16)
    return bf16, quantize_model_(copy.deepcopy(bf16))


def _float32_on_cpu(model, monkeypatch):
    """The FP8 model with its FP8 weights as they are and everything else in float32, on the CPU,
    where each FP8 weight is dequantized for its matmul and (patched in here) each activation
    rounded to e4m3 as the GPU kernels round it: the GPU's arithmetic in float32."""
    from dsv2.model import fp8_layers, moe
    from dsv2.model.kernels import fp8_gemm

    def linear(x, w, s, bias=None):
        return torch.nn.functional.linear(fake_quant(x), fp8.dequantize(w, s, x.dtype), bias)

    def grouped(x, w, s, counts, split=None):
        return fp8_gemm.grouped_mm_reference(fake_quant(x), w, s, counts, split)
    monkeypatch.setattr(fp8_layers, "fp8_linear", linear)
    monkeypatch.setattr(moe, "fp8_grouped_mm", grouped)
    return _fp32_activations(copy.deepcopy(model).to("cpu"))


@pytest.mark.parametrize("rows", [3, 40])  # the few-row FP8 kernel; the FP8 x FP8 GEMMs
def test_fp8_block_on_gpu_is_its_arithmetic_in_float32(monkeypatch, rows):
    """A decoder block (MLA's FP8 projections, the dense FP8 MLP) on the GPU against the same
    arithmetic in float32 on the CPU. What differs: bf16 between the ops, and with it the odd
    activation that lands on the other side of an e4m3 rounding boundary (a step of 2^-3 of it),
    ~1.5% here; a wrong scale or tile is tens of percent. One block: across layers of random
    weights such differences compound chaotically, whatever the precision."""
    _, q = _fp8_model(1, std=0.05, dense=True)
    assert q.layers[0].mlp.down_proj.weight.dtype == fp8.FP8 and q.layers[0].self_attn.o_proj.weight.dtype == fp8.FP8
    h = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(rows))
    positions = torch.arange(rows).expand(2, rows)
    with torch.no_grad():
        got = q.layers[0](h.to("cuda", torch.bfloat16), *q.rotary(positions.cuda()))[0].double().cpu()
        ref = _float32_on_cpu(q, monkeypatch)
        want = ref.layers[0](h.bfloat16().float(), *ref.rotary(positions))[0].double()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.05, rel


@pytest.mark.parametrize("tokens", [8, 300])  # the fused decode kernels; the grouped FP8 x FP8 GEMM
def test_fp8_moe_layer_against_float64(tokens):
    """One FP8 MoE layer on the GPU against float64 experts of its dequantized weights with its
    activations rounded alike, given the GPU's own routing (a near-tie in the gate may go either way)."""
    _, q = _fp8_model(3, std=0.1)
    layer = q.layers[1].mlp
    x = torch.randn(1, tokens, 256, generator=torch.Generator().manual_seed(tokens)).to("cuda", torch.bfloat16)
    with torch.no_grad():
        got, route = layer(x)
    e, s = layer.experts, layer.shared_experts
    routed = [w.double().cpu() for w in e.dequantized()]
    shared = [fp8.dequantize(m.weight.cpu(), m.weight_scale_inv.cpu(), torch.float64)
              for m in (s.gate_proj, s.up_proj, s.down_proj)]
    want = _fp8_experts_reference(x[0].double().cpu(), route.topk_idx.cpu(), route.topk_weight.double().cpu(),
                                  routed, shared)
    rel = ((got[0].double().cpu() - want).norm() / want.norm()).item()
    assert rel < 3e-2, rel


def _fp32_activations(model):
    """`model` (on its device) with its FP8 weights as they are and every other tensor and
    activation in float32."""
    for m in model.modules():
        if hasattr(m, "act_dtype"):
            m.act_dtype = torch.float32
    for p in model.parameters():
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    return model


def test_fp8_engine_greedy_equals_fp8_reference():
    """The engine on an FP8 model (FP8 x FP8 GEMMs in prefill, few-row FP8 linears once the batch
    is down to MAX_ROWS, graphed and compiled, then eager) picks the greedy tokens of the same
    model's plain forward, up to e4m3's rounding of the activations.

    Dense and in fp32, because with routing and bf16 no tolerance separates rounding from a bug: on
    the bundled model in FP8, noise of bf16's size on one hidden state flips token 1 of a prompt in
    a third of the trials through the experts it selects, and even in fp32 the two op orders put
    the odd activation on the other side of an e4m3 rounding boundary (a step of up to 2^-3 of it)
    once in ~10^5, which moved one logit by 6% through a changed routing. What remains is that
    step's effect: ~1% of the logits per flipped activation, so 2^-4 of the largest logit (a wrong
    scale or tile moves them by tens of percent). The MoE kernels: test_fp8_moe_layer_against_float64
    (given the GPU's own routing) and test_fp8_moe_decode_graph_matches_eager."""
    from dsv2.model.kernels.small_linear import MAX_ROWS

    _, model = _fp8_model(7, std=0.05, dense=True)
    model = _fp32_activations(model)
    assert model.layers[0].mlp.down_proj.weight.dtype == fp8.FP8
    g = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    prompts = [torch.randint(2, vocab, (5 + 9 * i,), generator=g).tolist() for i in range(5)]
    lengths = [12 - 2 * i for i in range(len(prompts))]  # the batch shrinks to MAX_ROWS and below
    assert len(prompts) > MAX_ROWS
    for eager in (False, True):
        engine = LLMEngine(model, None, EngineConfig(block_size=16, num_blocks=128, max_model_len=256, max_num_seqs=8,
                                                     max_num_batched_tokens=128, enforce_eager=eager))
        for p, tokens in zip(prompts, run_greedy(engine, prompts, lengths)):
            assert_greedy(model, p, tokens, ulps=2**-4 / torch.finfo(torch.float32).eps)


def test_fp8_moe_decode_graph_matches_eager():
    """An FP8 MoE model's captured, compiled decode step (fused FP8 experts, FP8 few-row linears)
    against the same step run eagerly, as the bf16 test does (tests/test_engine_gpu.py)."""
    _, model = _fp8_model(6, std=0.05)
    engine = LLMEngine(model, None, EngineConfig(block_size=16, num_blocks=128, max_model_len=512, max_num_seqs=16,
                                                 max_num_batched_tokens=256, async_scheduling=False))
    assert engine.runner.use_graphs, "FP8 MoE steps are capturable"
    assert_decode_graph_matches_eager(engine)

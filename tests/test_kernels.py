"""Engine kernels against their plain-PyTorch references, on fresh random inputs."""

import pytest
import torch

from dsv2.engine.kernels.mha_decode import mha_decode, mha_decode_reference
from dsv2.engine.kernels.mla_decode import mla_decode, mla_decode_reference
from dsv2.model import MLP, Experts, Gate, MoE
from dsv2.model.kernels.moe_gemm import fused_experts, fused_experts_reference
from dsv2.model.kernels.moe_route import moe_align, moe_align_reference

from .numerics import assert_close


def _tables(g, lengths, block_size, extra_width=0):
    """(block tables [B, max_blocks + extra_width], number of pages): pages scattered through the
    cache, with 3 pages nobody owns."""
    blocks_per = [(n + block_size - 1) // block_size for n in lengths]
    num_blocks = sum(blocks_per) + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lengths), max(blocks_per) + extra_width, dtype=torch.int32)
    at = 0
    for i, k in enumerate(blocks_per):
        tables[i, :k] = perm[at:at + k].int()
        at += k
    return tables, num_blocks


def _case(b, h, lengths, block_size=64, r=512, dr=64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    tables, num_blocks = _tables(g, lengths, block_size)
    kv = torch.randn(num_blocks, block_size, r + dr, generator=g)
    q_lat = torch.randn(b, h, r, generator=g)
    q_rope = torch.randn(b, h, dr, generator=g)
    to = dict(device=device)
    return (q_lat.to(**to), q_rope.to(**to), kv.to(**to), tables.to(**to),
            torch.tensor(lengths, dtype=torch.int32, device=device))


def test_reference_matches_dense_attention():
    q_lat, q_rope, kv, tables, lens = _case(2, 4, [70, 5], block_size=16, r=32, dr=8)
    out = mla_decode_reference(q_lat, q_rope, kv, tables, lens, 0.1, 32)
    for i, n in enumerate(lens.tolist()):
        rows = torch.cat([kv[p] for p in tables[i, : (n + 15) // 16].long()])[:n]
        want = ((q_lat[i] @ rows[:, :32].T + q_rope[i] @ rows[:, 32:].T) * 0.1).softmax(-1) @ rows[:, :32]
        assert_close(out[i], want, 2**5)  # one softmax-weighted sum over the pages, reordered


@pytest.mark.gpu
@pytest.mark.parametrize("b, h, lengths, splits", [
    (1, 16, [1], None), (3, 16, [63, 64, 65], None), (4, 128, [1000, 7, 4100, 129], None),
    (16, 16, list(range(1, 2000, 125)), 1), (16, 16, list(range(1, 2000, 125)), 8), (2, 20, [300, 900], None),
])
def test_triton_mla_decode_against_reference(b, h, lengths, splits):
    for seed in range(2):  # fresh inputs each time
        q_lat, q_rope, kv, tables, lens = _case(b, h, lengths, device="cuda", seed=seed)
        q_lat, q_rope, kv = q_lat.bfloat16(), q_rope.bfloat16(), kv.bfloat16()
        scale = 192 ** -0.5
        got = mla_decode(q_lat, q_rope, kv, tables, lens, scale, 512, num_splits=splits)
        want = mla_decode_reference(q_lat.double(), q_rope.double(), kv.double(), tables, lens, scale, 512)
        assert torch.isfinite(got).all()
        assert ((got.double() - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("h, v, lengths, splits", [(16, 128, [1], None), (16, 128, [1500], None), (20, 48, [300], 4),
                                                    (128, 128, [4100], None)])
def test_triton_mla_decode_folds_w_uv_for_one_sequence(h, v, lengths, splits):
    """One sequence: the merge takes each head's latent output through its W^UV ([H, v, r] inside
    kv_b_proj's per-head rows, strided), against the reference in float64."""
    for seed in range(2):
        q_lat, q_rope, kv, tables, lens = _case(1, h, lengths, device="cuda", seed=seed)
        q_lat, q_rope, kv = q_lat.bfloat16(), q_rope.bfloat16(), kv.bfloat16()
        g = torch.Generator(device="cuda").manual_seed(seed)
        kv_b = torch.randn(h, 128 + v, 512, device="cuda", generator=g) / 512 ** 0.5
        w_uv = kv_b.bfloat16()[:, 128:]
        scale = 192 ** -0.5
        got = mla_decode(q_lat, q_rope, kv, tables, lens, scale, 512, num_splits=splits, w_uv=w_uv)
        want = mla_decode_reference(q_lat.double(), q_rope.double(), kv.double(), tables, lens, scale, 512,
                                    w_uv.double())
        assert got.dtype == torch.bfloat16 and got.shape == (1, h, v)
        assert ((got.double() - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b, h, d, lengths, block_size, splits", [
    (1, 32, 128, [1], 64, None), (3, 8, 128, [63, 64, 65], 64, None),
    (4, 32, 128, [1000, 7, 4100, 129], 64, None),
    (16, 4, 64, list(range(1, 2000, 125)), 16, 1), (16, 4, 64, list(range(1, 2000, 125)), 16, 8),
    (2, 5, 128, [300, 900], 16, 64),  # more splits than the short row has pages: empty splits
])
def test_triton_mha_decode_against_reference(b, h, d, lengths, block_size, splits, dtype):
    for seed in range(2):  # fresh inputs each time
        g = torch.Generator().manual_seed(seed)
        # tables wider than any row needs, as the engine pads them to a captured width
        tables, num_blocks = _tables(g, lengths, block_size, extra_width=5)
        kv = torch.randn(num_blocks, block_size, 2 * h * d, generator=g).to("cuda", dtype)
        q = torch.randn(b, h, d, generator=g).to("cuda", dtype)
        tables, lens = tables.cuda(), torch.tensor(lengths, dtype=torch.int32, device="cuda")
        got = mha_decode(q, kv, tables, lens, d ** -0.5, num_splits=splits)
        want = mha_decode_reference(q, kv, tables, lens, d ** -0.5)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        # both compute in fp32 from the same stored values: only summation order differs
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b, h, kv_heads, d, lengths, block_size, splits", [
    (1, 32, 8, 128, [1], 64, None), (3, 32, 8, 128, [63, 64, 1000], 64, None),  # DeepSeek 67B's groups of 4
    (4, 8, 2, 64, [7, 300, 129, 64], 16, 4), (2, 16, 1, 128, [900, 33], 16, 64),  # MQA, empty splits
])
def test_triton_mha_decode_gqa_against_float64(b, h, kv_heads, d, lengths, block_size, splits, dtype):
    """Grouped-query rows (2 kv_heads d wide): query head j reads key/value head j // (h / kv_heads),
    checked against float64 attention written head by head, and the reference the CPU runs."""
    g = torch.Generator().manual_seed(7)
    tables, num_blocks = _tables(g, lengths, block_size, extra_width=3)
    kv = torch.randn(num_blocks, block_size, 2 * kv_heads * d, generator=g).to("cuda", dtype)
    q = torch.randn(b, h, d, generator=g).to("cuda", dtype)
    tables, lens = tables.cuda(), torch.tensor(lengths, dtype=torch.int32, device="cuda")
    got = mha_decode(q, kv, tables, lens, d ** -0.5, num_splits=splits)
    assert got.dtype == torch.float32 and got.shape == (b, h, d)
    torch.testing.assert_close(got, mha_decode_reference(q, kv, tables, lens, d ** -0.5), rtol=1e-4, atol=1e-4)
    group, width = h // kv_heads, kv_heads * d
    for i, n in enumerate(lengths):
        rows = kv[tables[i].long()].flatten(0, 1)[:n].double()  # [n, 2 Hkv D]
        k, v = rows[:, :width].unflatten(1, (kv_heads, d)), rows[:, width:].unflatten(1, (kv_heads, d))
        for head in range(h):
            probs = ((k[:, head // group] @ q[i, head].double()) * d ** -0.5).softmax(0)
            want = probs @ v[:, head // group]
            # fp32 accumulation of the same stored values: only rounding differs from float64
            torch.testing.assert_close(got[i, head].double(), want, rtol=1e-4, atol=1e-4)


def _expert_load(n, k, n_experts, g, skew=0.0):
    """topk_idx [n, k]: distinct experts per token; a `skew` share of tokens put expert 3 first,
    so one expert gets many rows (several row tiles) while others stay idle."""
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n)])
    hot = torch.rand(n, generator=g) < skew
    for t in hot.nonzero().flatten().tolist():
        row = idx[t]
        row[row == 3] = row[0]
        row[0] = 3
    return idx


def _experts_case(n, k, n_experts, inter, dim, n_shared, seed, device="cpu", dtype=torch.float32, skew=0.0):
    """Random routed and shared expert weights at fan-in scale, a routing, and gate values; NaN fills
    the weights of every expert no token chose, which must never be read."""
    g = torch.Generator().manual_seed(seed)
    idx = _expert_load(n, k, n_experts, g, skew)
    w_gate, w_up = (torch.randn(n_experts, inter, dim, generator=g) / dim ** 0.5 for _ in range(2))
    w_down = torch.randn(n_experts, dim, inter, generator=g) / inter ** 0.5
    idle = torch.ones(n_experts, dtype=torch.bool)
    idle[idx.flatten()] = False
    for w in (w_gate, w_up, w_down):
        w[idle] = float("nan")
    shared = None
    if n_shared:
        shared = (torch.randn(n_shared * inter, dim, generator=g) / dim ** 0.5,
                  torch.randn(n_shared * inter, dim, generator=g) / dim ** 0.5,
                  torch.randn(dim, n_shared * inter, generator=g) / (n_shared * inter) ** 0.5)
    x = torch.randn(n, dim, generator=g)
    weight = torch.rand(n, k, generator=g)
    to = {"device": device, "dtype": dtype}
    shared = None if shared is None else tuple(w.to(**to) for w in shared)
    return (x.to(**to), idx.to(device), weight.to(device), w_gate.to(**to), w_up.to(**to), w_down.to(**to), shared,
            idle)


def test_fused_experts_reference_is_the_moe_layer():
    x, idx, weight, w_gate, w_up, w_down, shared, idle = _experts_case(9, 3, 8, 16, 32, 2, seed=0)
    experts = Experts(8, 32, 16)
    mlp = MLP(32, 32)
    with torch.no_grad():
        for p, w in zip([experts.gate_proj, experts.up_proj, experts.down_proj], [w_gate, w_up, w_down]):
            p.copy_(w.nan_to_num())
        for lin, w in zip([mlp.gate_proj, mlp.up_proj, mlp.down_proj], shared):
            lin.weight.copy_(w)
        want = experts.reference(x, idx, weight) + mlp(x)
    got = fused_experts_reference(x, idx, weight, w_gate, w_up, w_down, shared)
    assert_close(got, want, 2**5)  # the same expert sums, gathered in another order


def test_moe_align_reference_sorts_assignments_by_expert():
    idx = torch.tensor([[2, 0], [2, 1], [0, 2]])
    rows, offsets = moe_align_reference(idx, 3, n_shared=1)  # expert 3 is the shared one
    # assignment t * 3 + k: token t's k-th expert (k = 2: the shared expert)
    assert offsets.tolist() == [0, 2, 3, 6, 9]
    assert rows.tolist() == [1, 6, 4, 0, 3, 7, 2, 5, 8]


@pytest.mark.gpu
@pytest.mark.parametrize("n, k, n_routed, n_shared", [
    (1, 6, 64, 2), (7, 6, 64, 2), (170, 6, 64, 2), (64, 6, 160, 2), (33, 2, 8, 0), (5, 1, 4, 1)])
def test_triton_moe_align_against_reference(n, k, n_routed, n_shared):
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        idx = _expert_load(n, k, n_routed, g, skew=0.5).cuda()
        rows, offsets = moe_align(idx, n_routed, n_shared)
        want_rows, want_offsets = moe_align_reference(idx.cpu(), n_routed, n_shared)
        assert torch.equal(offsets.cpu(), want_offsets)
        assert torch.equal(rows.cpu(), want_rows)


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [
    {},  # V2-Lite: greedy over 64 experts
    {"norm_topk_prob": True},
    {"n_routed_experts": 160, "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3,
     "routed_scaling_factor": 16.0, "hidden_size": 1024},  # V2's device-limited routing (a narrower d)
])
@pytest.mark.parametrize("n", [1, 37])
def test_triton_moe_route_against_gate(overrides, n):
    import dataclasses
    from dsv2.config import preset

    config = dataclasses.replace(preset("deepseek-v2-lite"), **overrides)
    for seed in range(2):
        torch.manual_seed(seed)
        gate = Gate(config).cuda()
        torch.nn.init.normal_(gate.weight, std=0.05)
        x = torch.randn(n, config.hidden_size, device="cuda")
        with torch.no_grad():
            want = gate(x)
            got = gate(x, fused=True)
        torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-6)
        # the same experts, in whatever order
        order_got, order_want = got.topk_idx.sort(1), want.topk_idx.sort(1)
        assert torch.equal(order_got.values, order_want.values)
        torch.testing.assert_close(got.topk_weight.gather(1, order_got.indices),
                                   want.topk_weight.gather(1, order_want.indices), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k, n_experts, inter, dim, n_shared, skew", [
    (1, 6, 64, 1408, 2048, 2, 0.0),  # V2-Lite, batch 1
    (64, 6, 64, 1408, 2048, 2, 0.3),  # V2-Lite, batch 64, one hot expert
    (40, 1, 64, 144, 80, 0, 1.0),  # every token on expert 3: 40 rows in 16-row tiles; K, N tails
    (9, 4, 8, 48, 96, 1, 0.5),
])
def test_triton_fused_experts_against_reference(n, k, n_experts, inter, dim, n_shared, skew, dtype):
    for seed in range(2):  # fresh inputs each time
        x, idx, weight, w_gate, w_up, w_down, shared, idle = _experts_case(
            n, k, n_experts, inter, dim, n_shared, seed, "cuda", dtype, skew)
        got = fused_experts(x, idx, weight, w_gate, w_up, w_down, shared)
        clean = [w.nan_to_num() for w in (w_gate, w_up, w_down)]
        want = fused_experts_reference(x.double(), idx, weight.double(), *(w.double() for w in clean),
                                       None if shared is None else tuple(w.double() for w in shared))
        assert got.dtype == dtype and got.shape == (n, dim)
        assert torch.isfinite(got).all()  # no idle expert's (NaN) weights were read
        err = (got.double() - want).norm() / want.norm()
        assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k, n_experts, inter, dim, n_shared", [
    (6, 64, 1408, 2048, 2),  # V2-Lite
    (6, 8, 256, 5120, 2),  # V2's hidden width: 80 column tiles
    (4, 8, 48, 96, 1),  # a column tail
    (1, 4, 32, 64, 0),  # one program per column tile
])
def test_triton_one_token_experts_add_the_residual_in_the_down_gemm(k, n_experts, inter, dim, n_shared, dtype):
    """One token: the down GEMM's last program per column tile sums the experts' parts and adds the
    residual. Against the reference; the same bits on every call (the sum's order is fixed, not
    the programs' finishing order), and the tile tickets back at zero after each launch."""
    from dsv2.model.kernels import moe_gemm

    for seed in range(2):
        x, idx, weight, w_gate, w_up, w_down, shared, _ = _experts_case(
            1, k, n_experts, inter, dim, n_shared, seed, "cuda", dtype, 0.0)
        residual = torch.randn(1, dim, device="cuda", dtype=dtype)
        got = fused_experts(x, idx, weight, w_gate, w_up, w_down, shared, residual=residual)
        clean = [w.nan_to_num() for w in (w_gate, w_up, w_down)]
        want = residual.double() + fused_experts_reference(
            x.double(), idx, weight.double(), *(w.double() for w in clean),
            None if shared is None else tuple(w.double() for w in shared))
        assert got.dtype == dtype and got.shape == (1, dim)
        err = (got.double() - want).norm() / want.norm()
        assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err
        for _ in range(20):
            assert torch.equal(fused_experts(x, idx, weight, w_gate, w_up, w_down, shared, residual=residual), got)
        assert not moe_gemm._tickets(x.device).any()


@pytest.mark.gpu
def test_moe_decode_batch_takes_fused_path_and_matches_reference(monkeypatch):
    import dataclasses
    from dsv2.config import preset
    from dsv2.model import moe

    calls = []
    monkeypatch.setattr(moe, "fused_experts", lambda *a, **kw: calls.append(1) or fused_experts(*a, **kw))
    config = dataclasses.replace(preset("dsv2-tiny"), hidden_size=256, moe_intermediate_size=128)
    torch.manual_seed(0)
    layer = MoE(config)
    for p in layer.parameters():
        p.data.normal_(0, 256 ** -0.5)
    x = torch.randn(8, 1, 256)  # a decode step: 8 sequences
    with torch.no_grad():
        want, route = layer.double()(x.double())
        layer = layer.to("cuda", torch.bfloat16)
        got, fused_route = layer(x.cuda().bfloat16())
    assert calls, "the decode-sized batch did not take the fused path"
    assert got.dtype == torch.bfloat16 and fused_route.scores.shape == route.scores.shape
    assert ((got.double().cpu() - want).norm() / want.norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m, n, n2, k", [
    (1, 3072, 576, 2048),  # V2-Lite q_proj with kv_a_proj_with_mqa, batch 1
    (3, 1536, 576, 5120),  # V2's q_a_proj with kv_a, 3 rows
    (4, 2048, 0, 10944),  # the dense down projection: K past one 1,024 run, with a tail
    (2, 101, 7, 48),  # odd column counts, K under one run
])
def test_triton_small_linear_against_reference(m, n, n2, k, dtype):
    from dsv2.model.kernels.small_linear import small_linear

    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        x, w, w2 = (torch.randn(*shape, generator=g) for shape in ((m, k), (n, k), (max(n2, 1), k)))
        args = [t.to("cuda", dtype) for t in (x, w, w2)][: 3 if n2 else 2]
        with torch.no_grad():
            got = small_linear(*args)
        assert len(got) == (2 if n2 else 1)
        for out, weight in zip(got, (w, w2)):
            want = x.double() @ weight.double().T
            assert out.dtype == dtype and out.shape == want.shape
            err = (out.double().cpu() - want).norm() / want.norm()
            assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


@pytest.mark.gpu
def test_triton_batched_small_linear_takes_strided_heads():
    from dsv2.model.kernels.small_linear import batched_small_linear

    g = torch.Generator().manual_seed(0)
    # W^UV as MLA slices it from kv_b_proj: [H, nope + v, r][:, nope:], and o_latent [B, H, r]
    # read as [H, B, r]
    kv_b = torch.randn(16, 256, 512, generator=g).cuda()
    o_latent = torch.randn(3, 16, 512, generator=g).cuda()
    with torch.no_grad():
        got = batched_small_linear(o_latent.transpose(0, 1), kv_b[:, 128:])
    want = torch.einsum("bhr,hvr->hbv", o_latent.double(), kv_b[:, 128:].double())
    assert ((got.double() - want).norm() / want.norm()) < 1e-5
    with torch.enable_grad():  # training never takes the kernel (it has no backward)
        w = kv_b[:, 128:].clone().requires_grad_()
        batched_small_linear(o_latent.transpose(0, 1), w).sum().backward()
    assert w.grad is not None


@pytest.mark.gpu
def test_triton_batched_small_linear_reads_fp32_input_with_bf16_weights():
    """MLA's W^UV takes the decode kernel's fp32 output as it is (no cast launch): bf16 out."""
    from dsv2.model.kernels.small_linear import batched_small_linear

    g = torch.Generator().manual_seed(1)
    w_uv = torch.randn(16, 128, 512, generator=g).to("cuda", torch.bfloat16)
    o_latent = torch.randn(2, 16, 512, generator=g).cuda()
    with torch.no_grad():
        got = batched_small_linear(o_latent.transpose(0, 1), w_uv)
    want = torch.einsum("bhr,hvr->hbv", o_latent.double(), w_uv.double())
    assert got.dtype == torch.bfloat16 and got.shape == (16, 2, 128)
    assert ((got.double() - want).norm() / want.norm()) < 5e-3  # the bf16 rounding of the output


@pytest.mark.gpu
def test_triton_batched_small_linear_reads_w_uk_transposed():
    from dsv2.model.kernels.small_linear import batched_small_linear

    g = torch.Generator().manual_seed(1)
    kv_b = torch.randn(16, 256, 512, generator=g).cuda().bfloat16()
    q_nope = torch.randn(2, 16, 128, generator=g).cuda().bfloat16()
    w_uk = kv_b[:, :128]  # [H, nope, r], r contiguous
    with torch.no_grad():
        got = batched_small_linear(q_nope.transpose(0, 1), w_uk.transpose(1, 2))
    want = torch.einsum("bhd,hdr->hbr", q_nope.double(), w_uk.double())
    assert got.shape == (16, 2, 512)
    assert ((got.double() - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, cache_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("b, h, nope, r, dr", [(1, 16, 128, 512, 64), (5, 20, 16, 32, 8)])
def test_triton_mla_prologue_against_reference(b, h, nope, r, dr, dtype, cache_dtype):
    from dsv2.engine.kernels import mla_prologue

    g = torch.Generator().manual_seed(b * h)
    q = torch.randn(b, h * (nope + dr), generator=g).to("cuda", dtype).unflatten(-1, (h, -1))
    kv = (3 * torch.randn(b, r + dr, generator=g)).to("cuda", dtype)
    # positions up to 160K (V2's context): cos and sin of arguments up to 10^5 radians
    positions = torch.randint(0, 160_000, (b,), generator=g)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dr, 2) / dr)
    freqs = positions.float()[:, None] * inv_freq
    cos, sin = (1.25 * freqs.cos()).cuda(), (1.25 * freqs.sin()).cuda()
    weight = (torch.rand(r, generator=g) + 0.5).to("cuda", dtype)
    cache = torch.zeros(3, 8, 16, r + dr, dtype=cache_dtype, device="cuda")  # [layers, blocks, block, width]
    slots = torch.randperm(8 * 16, generator=g)[:b].cuda()
    q_nope, q_rope = mla_prologue.launch(q, kv, positions.cuda(), inv_freq.cuda(), 1.25, weight, 1e-6, cache[1], slots, r)
    ref_nope, ref_rope, ref_rows = mla_prologue.mla_prologue_reference(q, kv, cos, sin, weight, 1e-6, r)
    torch.testing.assert_close(q_nope, ref_nope, rtol=0, atol=0)
    # the same fp32 math; the norm's sum and rsqrt may round differently by an ulp before the cast
    tol = dict(rtol=1e-5, atol=1e-5) if cache_dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(q_rope, ref_rope, **tol)
    rows = cache[1].view(-1, r + dr)
    torch.testing.assert_close(rows[slots], ref_rows.to(cache_dtype), **tol)
    untouched = torch.ones(rows.shape[0], dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert rows[untouched].abs().max() == 0 and cache[0].abs().max() == 0 and cache[2].abs().max() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("b, v, dtype", [(1, 102400, torch.bfloat16), (7, 5001, torch.float32), (3, 300, torch.bfloat16)])
def test_triton_greedy_against_reference(b, v, dtype):
    from dsv2.engine.kernels.greedy import greedy, greedy_reference

    g = torch.Generator().manual_seed(v)
    logits = (4 * torch.randn(b, v, generator=g)).to(dtype)
    logits[0, 11] = logits[0, v - 5] = logits[0].max() + 1  # a tie: the first index wins, as argmax
    if b > 1:
        logits[1, : v // 2] = float("-inf")
        logits[1, -1] = logits[1].max() + 2  # the last element of the row
    tokens, host = greedy(logits.cuda())
    ref_tokens, ref_logprobs = greedy_reference(logits)
    assert tokens.cpu().tolist() == ref_tokens.tolist() == host[0].long().cpu().tolist()
    assert tokens[0] == 11 and (b == 1 or tokens[1] == v - 1)
    torch.testing.assert_close(host[1].float().cpu(), ref_logprobs, rtol=1e-5, atol=1e-5)


def test_pdl_switch(monkeypatch):
    from dsv2.model.kernels import pdl

    monkeypatch.delenv("DSV2_PDL", raising=False)
    assert pdl.options(torch.empty(1)) == {"USE_GDC": False, "launch_pdl": False}  # CPU tensors launch no kernels
    if torch.cuda.is_available():
        assert pdl.enabled(torch.empty(1, device="cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
        monkeypatch.setenv("DSV2_PDL", "0")
        assert not pdl.enabled(torch.empty(1, device="cuda"))

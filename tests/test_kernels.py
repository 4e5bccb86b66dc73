"""Engine kernels against their plain-PyTorch references, on fresh random inputs."""

import pytest
import torch

from dsv2.engine.kernels.mha_decode import mha_decode, mha_decode_reference
from dsv2.engine.kernels.mla_decode import mla_decode, mla_decode_reference
from dsv2.model import Experts
from dsv2.model.kernels.moe_gemm import (
    moe_gemm,
    moe_gemm_reference,
    moe_gemm_swiglu,
    moe_gemm_swiglu_reference,
)


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
        assert torch.allclose(out[i], want, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
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
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
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


def _moe_case(n_experts, k, n, seed, device="cpu", dtype=torch.float32, extra_rows=0):
    """(x, w_gate, w_up, offsets, rows): every expert gets 0, 1, 17 or 40 rows, in shuffled order.
    NaN marks what must never be read: idle experts' weights and x's rows past offsets[E]."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([0, 1, 17, 40]).repeat(n_experts // 4 + 1)[:n_experts]
    counts = counts[torch.randperm(n_experts, generator=g)]
    rows = int(counts.sum())
    x = torch.randn(rows + extra_rows, k, generator=g)
    x[rows:] = float("nan")
    w_gate, w_up = (torch.randn(n_experts, n, k, generator=g) / k ** 0.5 for _ in range(2))
    w_gate[counts == 0] = float("nan")
    w_up[counts == 0] = float("nan")
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    to = {"device": device, "dtype": dtype}
    return x.to(**to), w_gate.to(**to), w_up.to(**to), offsets.to(device), rows


def test_moe_gemm_reference_matches_per_expert_matmul():
    x, w_gate, w_up, offsets, rows = _moe_case(6, 32, 16, seed=0, extra_rows=3)
    got = moe_gemm_reference(x, w_gate, offsets)
    act = moe_gemm_swiglu_reference(x, w_gate, w_up, offsets)
    for e in range(6):
        a, b = offsets[e].item(), offsets[e + 1].item()
        assert torch.allclose(got[a:b], x[a:b] @ w_gate[e].T, atol=1e-5)
        want = torch.nn.functional.silu(x[a:b] @ w_gate[e].T) * (x[a:b] @ w_up[e].T)
        assert torch.allclose(act[a:b], want, atol=1e-5)
    assert (got[rows:] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_experts, k, n", [
    (64, 2048, 1408), (64, 1408, 2048),  # V2-Lite's gate/up and down projections
    (8, 144, 80),  # a K tail past BLOCK_K and N short of BLOCK_N
])
@pytest.mark.parametrize("block_m", [None, 16, 64])  # 40 rows: 3 row tiles, or 1
def test_triton_moe_gemm_against_reference(n_experts, k, n, block_m, dtype):
    for seed in range(2):  # fresh inputs each time
        x, w_gate, w_up, offsets, rows = _moe_case(n_experts, k, n, seed, "cuda", dtype, extra_rows=5)
        clean = (w_gate.nan_to_num(), w_up.nan_to_num())
        for got, want in [
            (moe_gemm(x, w_gate, offsets, block_m=block_m), moe_gemm_reference(x, clean[0], offsets)),
            (moe_gemm_swiglu(x, w_gate, w_up, offsets, block_m=block_m),
             moe_gemm_swiglu_reference(x, *clean, offsets)),
        ]:
            assert got.dtype == dtype and got.shape == (rows + 5, n)
            got, want = got[:rows].double(), want[:rows].double()  # rows past offsets[E]: unwritten
            assert torch.isfinite(got).all()
            # the same stored values, fp32 accumulation on both sides: bf16 differs by its output rounding
            assert ((got - want).norm() / want.norm()) < (2e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_experts_decode_batch_takes_triton_and_matches_reference(monkeypatch):
    from dsv2.model import moe

    calls = []
    monkeypatch.setattr(moe, "moe_gemm_swiglu", lambda *a, **kw: calls.append(1) or moe_gemm_swiglu(*a, **kw))
    torch.manual_seed(0)
    experts = Experts(16, 256, 128)
    for p in experts.parameters():
        p.data.normal_(0, 256 ** -0.5)
    n, k = 8, 6  # a decode step: 8 sequences, 48 rows over 16 experts
    x = torch.randn(n, 256)
    idx = torch.stack([torch.randperm(16)[:k] for _ in range(n)])
    idx[:4, 0] = 3  # an uneven load; some experts go unused
    weight = torch.rand(n, k)
    with torch.no_grad():
        want = experts.double().reference(x.double(), idx, weight.double())
        got = experts.to("cuda", torch.bfloat16)(x.cuda().bfloat16(), idx.cuda(), weight.cuda())
    assert calls, "the decode-sized batch did not take the Triton path"
    assert got.dtype == torch.bfloat16
    assert ((got.double().cpu() - want).norm() / want.norm()) < 2e-2

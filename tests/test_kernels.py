"""Engine kernels against their plain-PyTorch references, on fresh random inputs."""

import pytest
import torch

from dsv2.engine.kernels.mha_decode import mha_decode, mha_decode_reference
from dsv2.engine.kernels.mla_decode import mla_decode, mla_decode_reference


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

"""The quantized latent cache: fp8 and 6-bit round trips within their error bounds, the true storage
cost, the paged cache quantizing on write and dequantizing on gather, and the engine generating with
it (close to the unquantized cache, not equal)."""

import math

import pytest
import torch

from dsv2.config import preset
from dsv2.engine import LLM, SamplingParams
from dsv2.engine.cache import (
    PagedLatentCache,
    dequantize_fp8,
    dequantize_int6,
    latent_row_bytes,
    pack_int6,
    quantize_fp8,
    quantize_int6,
    unpack_int6,
)
from dsv2.engine.runner import PagedBatchCache
from dsv2.info import kv_cache_per_token, kv_cache_vs_deepseek_67b

from .conftest import model_with_tokenizer, random_model, tiny_config
from .numerics import MODEL_ULPS, assert_close, tol


def _rows(n=64, width=512, seed=0):
    """Rows spanning six orders of magnitude, with outliers, as latents can have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) * torch.logspace(-3, 3, n)[:, None]
    x[::7, 5] *= 20
    return x


# --- the quantizers -------------------------------------------------------------------------------


def test_fp8_round_trip_relative_error():
    x = _rows()
    q, scale = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.shape == (x.shape[0], 1) and scale.dtype == torch.float32  # one scale per token
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 448)
    d = dequantize_fp8(q, scale)
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 relative for normal numbers; below the
    # smallest normal (2^-6 x scale) the step is 2^-9 x scale
    assert ((d - x).abs() <= 2**-4 * x.abs() + 2**-10 * scale).all()
    # amax maps to 448 exactly, then back through the fp32 scale: an ulp or two
    torch.testing.assert_close(d.abs().amax(-1), x.abs().amax(-1), rtol=tol(torch.float32, 2), atol=0)
    assert (d - x).norm() / x.norm() < 0.04


def test_int6_round_trip_error_is_half_a_step():
    x = _rows()
    packed, scale = quantize_int6(x, 64)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 384)  # 4 values per 3 bytes
    assert scale.dtype == torch.bfloat16 and scale.shape == (64, 8)  # one scale per group of 64
    amax = x.unflatten(-1, (8, 64)).abs().amax(-1)
    torch.testing.assert_close(scale.float(), amax / 31, rtol=2**-8, atol=0)
    d = dequantize_int6(packed, scale, 64)
    err = (d - x).unflatten(-1, (8, 64)).abs().amax(-1)
    assert (err <= scale.float() / 2 * (1 + 1e-5)).all()
    # the group spans [-amax, amax]: 62 steps, so the error is at most 1/124 of the range (< 1/32)
    assert (err <= 2 * amax / 120).all()


def test_int6_packing_is_exact():
    q = torch.arange(-32, 32).repeat(3)[torch.randperm(192, generator=torch.Generator().manual_seed(0))]
    packed = pack_int6(q.view(2, 96))
    assert packed.shape == (2, 72)
    assert torch.equal(unpack_int6(packed), q.view(2, 96).int())


def test_zero_rows_stay_zero():
    x = torch.zeros(3, 128)
    assert not dequantize_fp8(*quantize_fp8(x)).any()
    d = dequantize_int6(*quantize_int6(x, 64), 64)
    assert not d.any() and not d.isnan().any()


# --- storage cost ---------------------------------------------------------------------------------


def test_bits_per_element_of_the_576_row():
    # fp8: 512 x 1 + 4 (fp32 scale) + 64 x 2 (bf16 rope) = 644 bytes
    assert latent_row_bytes(512, 64, "fp8") == 644
    # 6bit: 512 x 6/8 + 8 x 2 (bf16 scale per 64) + 64 x 1 (fp8 rope) + 2 (its bf16 scale) = 466 bytes
    assert latent_row_bytes(512, 64, "6bit") == 466
    assert 8 * 466 / 576 == pytest.approx(6.47, abs=0.005)
    assert latent_row_bytes(512, 64, torch.bfloat16) == 1152
    config = preset("deepseek-v2-lite")
    assert PagedLatentCache.bytes_per_block(config, 64, "fp8") == 27 * 64 * 644
    assert PagedLatentCache.bytes_per_block(config, 64, "6bit") == 27 * 64 * 466
    assert PagedLatentCache.num_blocks_for(config, 10 * 27 * 64 * 466, 64, "6bit") == 10
    with pytest.raises(ValueError, match="kv cache dtype"):
        latent_row_bytes(512, 64, "int3")


@pytest.mark.parametrize("kv_dtype", ["fp8", "6bit", torch.bfloat16])
def test_allocated_bytes_match_bytes_per_block(kv_dtype):
    config = tiny_config()
    pages = PagedLatentCache(config, num_blocks=5, block_size=4, dtype=kv_dtype)
    assert pages.nbytes == 5 * PagedLatentCache.bytes_per_block(config, 4, kv_dtype)


def test_info_reports_each_cache_dtype():
    config = preset("deepseek-v2")
    mla = kv_cache_per_token(config)["mla"]
    assert mla["elements"] == 34_560 and mla["bytes_bf16"] == 69_120
    assert mla["cache_bytes"] == {"bfloat16": 69_120, "fp8": 60 * 644, "6bit": 60 * 466}
    assert mla["cache_bits_per_element"]["6bit"] == pytest.approx(6.47, abs=0.005)
    vs = kv_cache_vs_deepseek_67b(config)
    assert vs["deepseek_67b_elements"] == 194_560
    assert vs["reduction_paper_6_bits"] == pytest.approx(0.933, abs=5e-4)  # the paper's 93.3%
    assert 0.92 < vs["reduction_6bit"] < vs["reduction_paper_6_bits"]


# --- the paged cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype", ["fp8", "6bit"])
def test_paged_write_gather_quantized(kv_dtype):
    config = tiny_config()  # kv_lora_rank 32 (one 6-bit group of 32), rope 8
    r, dr, bs = config.kv_lora_rank, config.qk_rope_head_dim, 4
    pages = PagedLatentCache(config, num_blocks=6, block_size=bs, dtype=kv_dtype)
    assert pages.kv is None
    with pytest.raises(TypeError, match="plain view"):
        pages.c_kv(0)
    g = torch.Generator().manual_seed(0)
    c, k = torch.randn(7, r, generator=g), torch.randn(7, dr, generator=g)
    table = torch.tensor([[4, 1]])
    pos = torch.arange(7)
    pages.write(2, table[0, pos // bs] * bs + pos % bs, c, k)
    c_kv, k_rope = pages.gather(2, torch.tensor([[4, 1, -1]]), torch.tensor([7]))
    assert c_kv.shape == (1, 12, r) and c_kv.dtype == torch.float32
    tol = 2**-4 if kv_dtype == "fp8" else 1 / 50
    assert ((c_kv[0, :7] - c).abs() <= tol * c.abs().amax(-1, keepdim=True)).all()
    if kv_dtype == "fp8":
        assert torch.equal(k_rope[0, :7], k.bfloat16().float())  # rope kept in bf16
    else:
        assert ((k_rope[0, :7] - k).abs() <= 2**-4 * k.abs() + 2**-10 * k.abs().amax(-1, keepdim=True)).all()
    assert not c_kv[0, 7:].any() and not k_rope[0, 7:].any()  # past the length: zeroed
    # gather returns the dtype the model wrote in
    pages.write(2, torch.tensor([0]), c[:1].bfloat16(), k[:1].bfloat16())
    assert pages.gather(2, table, torch.tensor([3]))[0].dtype == torch.bfloat16


def _logits(model, tokens, kv_dtype, absorb):
    """One sequence through the engine's paged cache (prefill of every token)."""
    s, bs = tokens.shape[1], 8
    pages = PagedLatentCache(model.config, num_blocks=math.ceil(s / bs), block_size=bs, dtype=kv_dtype)
    cache = PagedBatchCache(pages, torch.arange(pages.num_blocks)[None], torch.tensor([s]))
    pos = torch.arange(s)[None]
    with torch.no_grad():
        return model(tokens, pos, torch.ones_like(tokens, dtype=torch.bool), cache, pos, absorb=absorb)


def test_logits_close_to_the_unquantized_cache():
    """Latent errors of a few percent move the logits by about as much; both attention forms read
    the same dequantized rows, so they still agree with each other to rounding."""
    model = random_model(tiny_config(), seed=3, std=0.05)
    tokens = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, tokens, torch.float32, absorb=False)
    for kv_dtype in ("fp8", "6bit"):
        out = _logits(model, tokens, kv_dtype, absorb=False)
        rel = ((out - ref).norm() / ref.norm()).item()
        assert 0 < rel < 0.06, (kv_dtype, rel)
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
        assert_close(_logits(model, tokens, kv_dtype, absorb=True), out, MODEL_ULPS)


# --- the engine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return model_with_tokenizer(tmp_path_factory.mktemp("model"), seed=31)


@pytest.mark.parametrize("kv_dtype", ["fp8", "6bit"])
def test_engine_generates_with_a_quantized_cache(model_dir, kv_dtype):
    path, _, tok = model_dir
    kw = {"device": "cpu", "block_size": 8, "num_blocks": 64, "max_num_batched_tokens": 48, "max_model_len": 256}
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(2, tok.vocab_size, (n,), generator=g).tolist()}
               for n in (5, 17, 30, 9, 40, 12, 25, 3)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    ref = LLM(path, **kw).generate(prompts, params)
    llm = LLM(path, kv_cache_dtype=kv_dtype, **kw)
    assert llm.engine.pages.kv_dtype == kv_dtype
    outs = llm.generate(prompts, params)
    assert all(len(o.outputs[0].token_ids) == 10 for o in outs)
    assert llm.engine.blocks.all_free()
    # greedy paths may part ways after a near tie, but most first tokens (from the prefill) agree
    first = [o.outputs[0].token_ids[0] == r.outputs[0].token_ids[0] for o, r in zip(outs, ref)]
    assert sum(first) >= 6, first


def test_bf16_cache_under_an_fp32_model(model_dir):
    """gather hands back the model's dtype, so a bf16 cache serves an fp32 model (CPU)."""
    path, _, _ = model_dir
    llm = LLM(path, device="cpu", kv_cache_dtype="bfloat16", block_size=8, num_blocks=16, max_model_len=128)
    assert llm.engine.pages.kv.dtype == torch.bfloat16
    out = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0.0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4

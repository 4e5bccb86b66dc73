"""The dense MHA baseline (DeepSeek LLM: LLaMA's architecture) and its grouped-query (GQA) and
multi-query (MQA) variants: logits against transformers' LlamaForCausalLM on the same weights, their
caches, checkpoints, config and the engine."""

import json
import random
import subprocess
import sys

import pytest
import torch

from dsv2.checkpoint import load_model, save_model
from dsv2.config import PRESETS, ConfigError, ModelConfig, preset
from dsv2.engine.cache import PagedLatentCache
from dsv2.engine.engine import EngineConfig, LLMEngine
from dsv2.engine.kernels.mha_decode import mha_decode, mha_decode_reference
from dsv2.generate import generate
from dsv2.info import kv_cache_per_token, model_info
from dsv2.model import MHA, LatentCache

from .conftest import random_model, run_greedy
from .numerics import MODEL_ULPS, assert_close, assert_greedy

RELEASED_7B = {  # deepseek-llm-7b-base's config.json as released
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 100000, "eos_token_id": 100001,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 30, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "vocab_size": 102400,
}


def tiny_mha(**overrides):
    return preset("dsv2-tiny-mha", **overrides)


# the tiny model's 4 heads with their own key/value heads, 2 groups of 2 (GQA) and one group (MQA)
KV_HEADS = [4, 2, 1]


def hf_llama(model):
    """transformers' LlamaForCausalLM built from the equivalent LlamaConfig, holding model's weights."""
    transformers = pytest.importorskip("transformers")
    skip = ("architectures", "model_type", "torch_dtype")
    fields = {k: v for k, v in model.config.to_hf().items() if k not in skip}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    # the checkpoint's names: the model's own under "model.", except the head
    state = model.state_dict()
    hf.load_state_dict({k if k.startswith("lm_head.") else f"model.{k}": v for k, v in state.items()})
    return hf


def _tokens(config, shape, seed):
    return torch.randint(2, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# --- (a) logits against transformers ---------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "num_hidden_layers": 2},
                                       {"num_key_value_heads": 2},
                                       {"num_key_value_heads": 1, "attention_bias": True, "num_hidden_layers": 2}])
def test_logits_match_transformers_llama(overrides):
    model = random_model(tiny_mha(**overrides), seed=1)
    if overrides.get("attention_bias"):
        with torch.no_grad():  # init_weights zeroes biases; a zero bias would hide a missing one
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.1)
    hf = hf_llama(model)
    tokens = _tokens(model.config, (2, 64), seed=2)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.abs().max() > 1  # not a degenerate model
    assert_close(ours, theirs, MODEL_ULPS)


@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_padded_batch_matches_transformers_llama(kv_heads):
    model = random_model(tiny_mha(num_key_value_heads=kv_heads), seed=3)
    hf = hf_llama(model)
    tokens = _tokens(model.config, (3, 48), seed=4)
    mask = torch.ones(3, 48, dtype=torch.long)
    mask[0, :20] = 0  # left padding
    mask[1, 40:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
        theirs = hf(tokens, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert_close(ours[real], theirs[real], MODEL_ULPS)


def test_blocks_are_mha_with_llama_names():
    model = random_model(tiny_mha())
    assert all(isinstance(layer.self_attn, MHA) and not layer.is_moe for layer in model.layers)
    names = {n for n, _ in model.named_parameters() if n.startswith("layers.0.")}
    assert names == {f"layers.0.{n}.weight" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}


# --- (b) generation with and without the cache ------------------------------------------------------
@pytest.mark.parametrize("padding_side, kv_heads", [("left", 4), ("right", 4), ("left", 2), ("right", 1)])
def test_greedy_with_cache_equals_without(padding_side, kv_heads):
    model = random_model(tiny_mha(num_key_value_heads=kv_heads), seed=6, std=0.2)
    prompts = [_tokens(model.config, (n,), seed=n).tolist() for n in (5, 17, 1, 30)]
    cached = generate(model, prompts, 24, padding_side=padding_side)
    others = [generate(model, prompts, 24, padding_side=padding_side, use_cache=False),
              generate(model, prompts, 24, padding_side=padding_side, absorb=True),  # MLA's switch
              [generate(model, [p], 24)[0] for p in prompts]]
    for out in [cached, *others]:  # each the model's greedy choice, up to the rounding of its path
        for p, tokens in zip(prompts, out, strict=True):
            assert len(tokens) == 24
            assert_greedy(model, p, tokens)
    assert len({tuple(c) for c in cached}) > 1


def test_caches_hold_keys_and_values_of_every_head():
    c = tiny_mha()
    assert c.cache_widths() == (64, 64)  # 4 heads x 16
    cache = LatentCache(c, batch=2, max_len=10)
    assert cache.c_kv.shape == (3, 2, 10, 64) and cache.k_rope.shape == (3, 2, 10, 64)
    pages = PagedLatentCache(c, num_blocks=5, block_size=4, dtype=torch.float32)
    assert pages.kv.shape == (3, 5, 4, 128) and (pages.kv_lora_rank, pages.rope_dim) == (64, 64)
    big = preset("deepseek-llm-7b")
    assert PagedLatentCache.bytes_per_block(big, 64) == 30 * 64 * 2 * 4096 * 2
    assert PagedLatentCache.num_blocks_for(big, 10 * 30 * 64 * 16384 + 1) == 10
    for quantized in ("fp8", "6bit"):
        with pytest.raises(ValueError, match="MLA"):
            PagedLatentCache(c, num_blocks=5, block_size=4, dtype=quantized)
        with pytest.raises(ValueError, match="MLA"):
            PagedLatentCache.bytes_per_block(big, 64, quantized)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_gqa_and_mqa_cache_their_key_value_heads_only(kv_heads):
    c = tiny_mha(num_key_value_heads=kv_heads)
    width = kv_heads * 16
    assert c.cache_widths() == (width, width)
    attn = random_model(c).layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 64) and attn.o_proj.weight.shape == (64, 64)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (width, 64)
    cache = LatentCache(c, batch=2, max_len=10)
    assert cache.c_kv.shape == (3, 2, 10, width) and cache.k_rope.shape == (3, 2, 10, width)
    pages = PagedLatentCache(c, num_blocks=5, block_size=4, dtype=torch.float32)
    assert pages.kv.shape == (3, 5, 4, 2 * width)
    # DeepSeek LLM 7B's shape with 8 key/value heads (as DeepSeek 67B has) or one: 4x, 32x smaller
    big = preset("deepseek-llm-7b", num_key_value_heads=8 // kv_heads)
    assert PagedLatentCache.bytes_per_block(big, 64) == 30 * 64 * 2 * (8 // kv_heads) * 128 * 2


# --- (c) checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_save_load_round_trip_with_llama_names(tmp_path, kv_heads):
    model = random_model(tiny_mha(num_key_value_heads=kv_heads), seed=7)
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == kv_heads and config["num_attention_heads"] == 4
    assert "kv_lora_rank" not in config and "n_routed_experts" not in config
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        k_shape = f.get_slice("model.layers.1.self_attn.k_proj.weight").get_shape()
    assert {"model.layers.2.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
            "model.layers.1.mlp.gate_proj.weight", "model.embed_tokens.weight", "model.norm.weight",
            "lm_head.weight"} <= names
    assert k_shape == [kv_heads * 16, 64]  # the key/value heads only
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    want = model.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in loaded.state_dict().items())
    tokens = _tokens(model.config, (2, 20), seed=8)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_saved_files_load_in_transformers_as_llama(tmp_path, kv_heads):
    transformers = pytest.importorskip("transformers")
    model = random_model(tiny_mha(num_key_value_heads=kv_heads), seed=9)
    save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == kv_heads
    tokens = _tokens(model.config, (2, 32), seed=10)
    with torch.no_grad():
        assert_close(model(tokens), hf(tokens).logits, MODEL_ULPS)
    hf.save_pretrained(tmp_path / "hf")  # and transformers' own files load here
    again = load_model(tmp_path / "hf")
    with torch.no_grad():
        assert_close(again(tokens), model(tokens), MODEL_ULPS)  # other weight layouts: other GEMM paths


# --- (d) the engine -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dsv2-tiny-mha", "dsv2-tiny-gqa", "dsv2-tiny-mqa"])
def test_engine_greedy_tokens_equal_the_reference(name):
    model = random_model(preset(name), seed=11, std=0.2)
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=6, max_num_batched_tokens=24, block_size=8,
                                                 num_blocks=40, max_model_len=128))
    rng = random.Random(0)
    shared = [rng.randrange(2, 512) for _ in range(16)]  # two full blocks: prefix-cache hits
    prompts = [shared[: rng.choice([0, 16])] + [rng.randrange(2, 512) for _ in range(rng.randrange(1, 40))]
               for _ in range(10)]
    lengths = [rng.randrange(1, 20) for _ in prompts]
    done = run_greedy(engine, prompts, lengths)
    assert max(map(len, prompts)) > 24  # some prompt needed more than one chunk
    for i, (p, m) in enumerate(zip(prompts, lengths)):
        assert len(done[i]) == m
        assert_greedy(model, p, done[i])
    assert engine.blocks.all_free()
    assert engine.pages.width == 2 * model.config.num_key_value_heads * 16  # the kv heads only


class KernelDecodeCache:
    """The hook a decode step's cache offers MHA (the engine's PagedBatchCache on CUDA): store the
    step's keys and values in the pages, then attend by the kernel straight over them."""

    def __init__(self, pages, block_tables, context_lens):
        self.pages, self.block_tables, self.context_lens = pages, block_tables, context_lens
        self.layers_attended = 0

    def begin(self, positions, valid, slots):
        self.slots = slots.flatten()
        return None  # the kernel bounds each row by context_lens

    def layer(self, i):
        return KernelDecodeLayer(self, i)


class KernelDecodeLayer:
    decode_kernel = True

    def __init__(self, step, i):
        self.step, self.i = step, i

    def store(self, k, v):
        self.step.pages.write(self.i, self.step.slots, k.flatten(0, 1), v.flatten(0, 1))

    def decode_attention_mha(self, q, scale):
        s = self.step
        s.layers_attended += 1
        return mha_decode(q, s.pages.kv[self.i], s.block_tables, s.context_lens, scale)


@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_kernel_decode_path_equals_the_full_forward(kv_heads):
    config = tiny_mha(num_key_value_heads=kv_heads)
    model = random_model(config, seed=13)
    lengths, bs = [11, 5], 4
    tokens = _tokens(config, (2, 12), seed=14)  # row i decodes tokens[i, lengths[i]] after its prompt
    tables = torch.tensor([[3, 0, 7, 1], [5, 2, 9, 9]])  # the second row's last two entries unused
    pages = PagedLatentCache(config, num_blocks=10, block_size=bs, dtype=torch.float32)
    with torch.no_grad():
        for i, n in enumerate(lengths):  # prompts through the contiguous cache, copied into the pages
            cache, pos = LatentCache(config, 1, n), torch.arange(n)
            model(tokens[i:i + 1, :n], pos[None], None, cache, pos[None])
            slots = tables[i, pos // bs] * bs + pos % bs
            for layer in range(config.num_hidden_layers):
                pages.write(layer, slots, cache.c_kv[layer, 0], cache.k_rope[layer, 0])  # k, v
        pos = torch.tensor(lengths)[:, None]
        slots = tables.gather(1, pos // bs) * bs + pos % bs
        step = KernelDecodeCache(pages, tables, torch.tensor(lengths) + 1)
        got = model(tokens.gather(1, pos), pos, None, step, slots)[:, 0]
        want = torch.stack([model(tokens[i:i + 1, : n + 1])[0, -1] for i, n in enumerate(lengths)])
    assert step.layers_attended == config.num_hidden_layers
    assert_close(got, want, MODEL_ULPS)


# --- (e) config ---------------------------------------------------------------------------------------
def test_released_7b_config_reads_and_round_trips():
    c = ModelConfig.from_hf(RELEASED_7B)
    assert c.attention_type == "mha" and c == preset("deepseek-llm-7b")
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (0, 128, 128)
    assert c.kv_lora_rank is None and c.n_routed_experts is None
    assert not any(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    assert c.softmax_scale == 128 ** -0.5
    again = c.to_hf()
    for key, value in RELEASED_7B.items():
        if key != "transformers_version":
            assert again[key] == value, key
    assert ModelConfig.from_hf(again) == c


def test_config_written_by_transformers_reads(tmp_path):
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in tiny_mha().to_hf().items() if k not in ("architectures", "model_type")}
    transformers.LlamaConfig(**fields).save_pretrained(tmp_path)  # head_dim, mlp_bias, rope_parameters, dtype
    assert ModelConfig.from_hf(tmp_path).replace(extra={}) == tiny_mha()


def test_derived_head_widths_follow_replace():
    c = tiny_mha().replace(hidden_size=128)
    assert (c.qk_rope_head_dim, c.v_head_dim, c.cache_widths()) == (32, 32, (128, 128))


@pytest.mark.parametrize("change, field, why", [
    (dict(num_key_value_heads=3), "num_key_value_heads", "must divide num_attention_heads \\(32\\)"),
    (dict(num_key_value_heads=64), "num_key_value_heads", "must divide num_attention_heads \\(32\\)"),
    (dict(num_key_value_heads=0), "num_key_value_heads", "must be a positive integer"),
    (dict(kv_lora_rank=32), "kv_lora_rank", "must be null"),
    (dict(q_lora_rank=32), "q_lora_rank", "must be null"),
    (dict(n_routed_experts=8, num_experts_per_tok=2), "n_routed_experts", "must be null"),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling", "must be null"),
    (dict(attention_type="gqa"), "attention_type", "expected one of"),
    (dict(head_dim=32), "head_dim", "hidden_size / num_attention_heads"),
    (dict(mlp_bias=True), "mlp_bias", "not supported"),
    (dict(num_attention_heads=5), "num_attention_heads", "must divide hidden_size"),
])
def test_bad_mha_config_names_the_field(change, field, why):
    with pytest.raises(ConfigError, match=f"'{field}'.*{why}"):
        ModelConfig.from_hf({**RELEASED_7B, **change})


def test_gqa_and_mqa_configs_read_and_round_trip():
    for kv_heads in (8, 1):  # DeepSeek 67B's 8 key/value heads on the 7B shape; MQA
        c = ModelConfig.from_hf({**RELEASED_7B, "num_key_value_heads": kv_heads})
        assert c.attention_type == "mha" and c.num_key_value_heads == kv_heads
        assert c.cache_widths() == (kv_heads * 128, kv_heads * 128)
        assert ModelConfig.from_hf(c.to_hf()) == c and c.to_hf()["num_key_value_heads"] == kv_heads
    # the ablations' way in: the MHA preset with overrides (the tiny GQA/MQA presets are the same)
    assert preset("dsv2-tiny-mha", num_key_value_heads=1) == preset("dsv2-tiny-mqa")
    assert preset("dsv2-tiny-mha", num_key_value_heads=2) == preset("dsv2-tiny-gqa")
    # the MHA presets leave num_key_value_heads to follow the heads: more heads stay MHA
    assert preset("dsv2-tiny-mha", num_attention_heads=8).num_key_value_heads == 8


def test_llama_config_needs_no_mla_fields_but_its_own():
    d = dict(RELEASED_7B)
    del d["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_hf(d)
    with pytest.raises(ConfigError, match="kv_lora_rank"):  # an MLA config still needs its widths
        ModelConfig.from_hf({k: v for k, v in RELEASED_7B.items() if k != "model_type"})


def test_mla_presets_are_untouched():
    for name in ("deepseek-v2", "deepseek-v2-lite", "dsv2-tiny", "dsv2-small", "dsv2-1b-moe", "dsv2-1b-lite"):
        c = preset(name)
        assert c.attention_type == "mla" and "attention_type" not in c.to_hf()
        assert c.cache_widths() == (c.kv_lora_rank, c.qk_rope_head_dim)
    assert {"deepseek-llm-7b", "dsv2-tiny-mha", "dsv2-tiny-gqa", "dsv2-tiny-mqa"} <= set(PRESETS)


# --- info -----------------------------------------------------------------------------------------------
def test_info_reports_the_7b_model():
    info = model_info(preset("deepseek-llm-7b"))
    assert info["attention_type"] == "mha" and info["moe_layers"] == 0
    assert info["parameters"]["total_billions"] == pytest.approx(6.91, abs=0.01)
    kv = info["kv_cache_per_token"]
    assert "mla" not in kv
    assert kv["mha"]["elements"] == 30 * 2 * 4096 and kv["mha"]["cache_bytes"] == {"bfloat16": 491_520}


@pytest.mark.parametrize("kv_heads, kind", [(32, "mha"), (8, "gqa_8_groups"), (4, "gqa_4_groups"), (1, "mqa")])
def test_info_reports_the_key_value_heads_cache(kv_heads, kind):
    info = model_info(preset("deepseek-llm-7b", num_key_value_heads=kv_heads))
    assert info["kv_cache_kind"] == kind
    kv = info["kv_cache_per_token"]
    own = 30 * 2 * kv_heads * 128
    assert kv[kind]["elements"] == own and kv[kind]["cache_bytes"] == {"bfloat16": 2 * own}
    assert kv[kind]["cache_bits_per_element"] == {"bfloat16": 16.0}
    # the comparison rows are the heads' equivalents whatever the model caches; only its own has cache_bytes
    assert kv["mha"]["elements"] == 30 * 2 * 32 * 128 and kv["gqa_8_groups"]["elements"] == 30 * 2 * 8 * 128
    assert kv["mqa"]["elements"] == 30 * 2 * 128
    assert [k for k, row in kv.items() if "cache_bytes" in row] == [kind]
    assert list(kv)[0] == "mha" and list(kv)[-1] == "mqa"


def test_info_adds_a_gqa_models_own_groups_to_the_table():
    kv = kv_cache_per_token(preset("dsv2-tiny-gqa"))  # 4 heads in 2 groups, 3 layers of 16-wide heads
    assert list(kv) == ["mha", "gqa_2_groups", "gqa_8_groups", "mqa"]
    assert kv["gqa_2_groups"]["elements"] == 3 * 2 * 2 * 16
    assert kv["gqa_2_groups"]["cache_bytes"] == {"bfloat16": 3 * 2 * 2 * 16 * 2}


def test_info_command_takes_the_preset():
    proc = subprocess.run([sys.executable, "-m", "dsv2.cli", "info", "--preset", "deepseek-llm-7b"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kv_cache_per_token"]["mha"]["bytes_bf16"] == 491_520


# --- (f) the decode kernel's reference --------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_decode_reference_matches_dense_attention(kv_heads):
    g = torch.Generator().manual_seed(12)
    b, h, d, block_size, lengths = 3, 4, 16, 8, [19, 1, 40]
    tables = torch.tensor([[4, 0, 7, -1, -1], [2, -1, -1, -1, -1], [1, 3, 5, 6, 8]])  # -1: unused slots
    kv = torch.randn(9, block_size, 2 * kv_heads * d, generator=g)
    q = torch.randn(b, h, d, generator=g)
    out = mha_decode_reference(q, kv, tables, torch.tensor(lengths), 0.3)
    width = kv_heads * d
    for i, n in enumerate(lengths):
        rows = torch.cat([kv[p] for p in tables[i] if p >= 0])[:n]  # [n, 2 Hkv D]
        k, v = rows[:, :width].view(n, kv_heads, d), rows[:, width:].view(n, kv_heads, d)
        for head in range(h):
            kv_head = head // (h // kv_heads)  # LLaMA's grouping: consecutive query heads share one
            probs = ((k[:, kv_head] @ q[i, head]) * 0.3).softmax(0)
            assert_close(out[i, head], probs @ v[:, kv_head], 2**5)  # one softmax-weighted sum, reordered
    with pytest.raises(ValueError, match="dividing the 4 query heads"):  # rows of 3 key/value heads
        mha_decode_reference(q, kv.new_zeros(9, block_size, 6 * d), tables, torch.tensor(lengths), 0.3)

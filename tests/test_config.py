import json

import pytest

from dsv2.config import PRESETS, ConfigError, ModelConfig, RopeScaling, preset

RELEASED_LITE = {  # DeepSeek-V2-Lite's config.json as released
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def test_released_config_reads_and_round_trips():
    c = ModelConfig.from_hf(RELEASED_LITE)
    assert c.rope_scaling == RopeScaling(factor=40, original_max_position_embeddings=4096)
    assert c.q_lora_rank is None and c.n_routed_experts == 64 and c.extra["auto_map"]
    again = c.to_hf()
    for key, value in RELEASED_LITE.items():
        if key != "transformers_version":
            assert again[key] == value, key
    assert ModelConfig.from_hf(again) == c


def test_preset_matches_released_lite():
    assert preset("deepseek-v2-lite").to_hf() | {"auto_map": None} == ModelConfig.from_hf(
        RELEASED_LITE).to_hf() | {"auto_map": None}


def test_transformers5_rope_parameters_spelling(tmp_path):
    d = dict(RELEASED_LITE)
    rs = d.pop("rope_scaling")
    d.pop("rope_theta")
    rs["rope_type"] = rs.pop("type")
    d["rope_parameters"] = dict(rs, rope_theta=10000.0, beta_fast=None)  # v5 may write nulls
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = ModelConfig.from_hf(tmp_path)
    assert c.rope_theta == 10000.0 and c.rope_scaling.factor == 40 and c.rope_scaling.beta_fast == 32
    assert c == ModelConfig.from_hf(RELEASED_LITE).replace(extra=c.extra)


def test_config_written_by_transformers_reads(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV2Config(**{k: v for k, v in preset("dsv2-tiny").to_hf().items()
                                          if k not in ("architectures", "model_type")})
    hf.save_pretrained(tmp_path)
    ours = ModelConfig.from_hf(tmp_path)
    want = preset("dsv2-tiny")
    for f in ("hidden_size", "q_lora_rank", "n_group", "topk_group", "routed_scaling_factor", "rope_theta",
              "rope_scaling", "kv_lora_rank", "first_k_dense_replace"):
        assert getattr(ours, f) == getattr(want, f), f


def test_softmax_scale_has_yarn_mscale_squared():
    c = preset("deepseek-v2")
    m = 0.1 * 0.707 * __import__("math").log(40) + 1
    assert abs(m - 1.2608) < 1e-4
    assert c.softmax_scale == pytest.approx(192 ** -0.5 * m * m)


@pytest.mark.parametrize("change, field", [
    (dict(topk_method="noaux_tc"), "topk_method"),
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=9), "topk_group"),
    (dict(num_experts_per_tok=100), "num_experts_per_tok"),
    (dict(hidden_size=-4), "hidden_size"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2}), "rope_scaling.type"),
    (dict(rope_scaling={"type": "yarn", "factor": 2, "warp": 1}), "rope_scaling"),
    (dict(hidden_size="2048"), "hidden_size"),
])
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_hf({**RELEASED_LITE, **change})


def test_missing_required_field_is_named(tmp_path):
    d = dict(RELEASED_LITE)
    del d["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig.from_hf(d)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_hf(tmp_path / "nowhere")


def test_every_preset_is_valid():
    for name in PRESETS:
        assert ModelConfig.from_hf(preset(name).to_hf()) == preset(name)
    with pytest.raises(KeyError, match="unknown preset"):
        preset("deepseek-v9")

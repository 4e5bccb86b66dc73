"""FP8 weights in DeepSeek-V3's block-scaled layout: the quantizer against float64, the checkpoint
format both ways (save_model, load_model, `dsv2 quantize`), its errors, and what `dsv2 info` counts."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv2.checkpoint import CheckpointError, checkpoint_tensors, load_model, save_model
from dsv2.config import preset
from dsv2.info import model_info
from dsv2.model import fp8
from dsv2.quantize import quantize_checkpoint

from .conftest import random_model, tiny_config
from .numerics import assert_close


@pytest.mark.parametrize("shape", [(128, 128), (300, 200), (257, 129), (1, 5), (512, 64)])
def test_quantize_against_float64(shape):
    g = torch.Generator().manual_seed(sum(shape))
    # blocks of very different magnitudes, as real weights have
    w = torch.randn(shape, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, shape[1], dtype=torch.float64)
    q, scale = fp8.quantize(w)
    assert q.dtype == fp8.FP8 and q.shape == shape and scale.dtype == torch.float32
    assert scale.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    deq = fp8.dequantize(q, scale, torch.float64)
    per_element = scale.double().repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 of a normal value; below the smallest normal
    # (2^-6 of the block's scale) the step is 2^-9 of it; the scale itself is rounded to fp32
    bound = 2**-4 * w.abs() + 2**-10 * per_element + 2**-20 * w.abs()
    assert ((deq - w).abs() <= bound).all()
    blocks = fp8._blocks(w.abs())
    torch.testing.assert_close(fp8._blocks(deq.abs()).amax(dim=(1, 3)), blocks.amax(dim=(1, 3)),
                               rtol=2**-20, atol=0)  # each block's largest weight maps onto 448 exactly


def test_zero_blocks_and_shape_errors():
    w = torch.zeros(130, 260)
    w[:128, :128] = 1.5
    q, scale = fp8.quantize(w)
    assert scale[0, 0] == 1.5 / 448 and (scale[1:] == 1).all() and (scale[0, 1:] == 1).all()
    assert torch.equal(fp8.dequantize(q, scale), w)
    with pytest.raises(fp8.QuantizationError, match=r"weight_scale_inv of shape \[2, 2\]"):
        fp8.dequantize(q, scale[:, :2])
    with pytest.raises(fp8.QuantizationError, match="2-D"):
        fp8.quantize(torch.zeros(2, 3, 4))


def test_the_released_tensor_list():
    quantized = [f"model.layers.3.self_attn.{p}.weight" for p in
                 ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
    quantized += [f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    quantized += ["model.layers.5.mlp.shared_experts.up_proj.weight", "model.layers.5.mlp.experts.159.down_proj.weight"]
    kept = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.1.input_layernorm.weight", "model.layers.1.self_attn.kv_a_layernorm.weight",
            "model.layers.1.self_attn.q_a_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"]
    assert all(fp8.is_quantized(n) for n in quantized) and not any(fp8.is_quantized(n) for n in kept)


@pytest.mark.parametrize("change, message", [
    ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
    ({"weight_block_size": [64, 64]}, r"weight_block_size \[64, 64\] is not supported"),
    ({"fmt": "e5m2"}, "fmt 'e5m2' is not supported"),
    ({"activation_scheme": "static"}, "activation_scheme 'static'"),
])
def test_unsupported_quantization_configs(change, message):
    assert fp8.check_config(dict(fp8.QUANTIZATION_CONFIG)) == "fp8"
    with pytest.raises(fp8.QuantizationError, match=message):
        fp8.check_config({**fp8.QUANTIZATION_CONFIG, **change})


@pytest.fixture(scope="module")
def model():
    # widths past one block (192, 320) so that blocks and padding both occur
    return random_model(tiny_config(hidden_size=192, moe_intermediate_size=160, intermediate_size=320), seed=4)


def test_save_and_load_fp8(model, tmp_path):
    save_model(model, tmp_path, quantization="fp8", max_shard_size=200_000)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == fp8.QUANTIZATION_CONFIG
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    loaded = load_model(tmp_path, quantization="none")
    originals = dict(checkpoint_tensors(model))
    for name, t in checkpoint_tensors(loaded):
        with safe_open(str(tmp_path / index[name]), "pt") as f:
            stored = f.get_tensor(name)
        if fp8.is_quantized(name):
            assert stored.dtype == fp8.FP8 and name + fp8.SCALE_SUFFIX in index
            # the loader's dequantization, the same ops as here: exact
            assert torch.equal(t, fp8.dequantize(*fp8.quantize(originals[name]), t.dtype)), name
        else:
            assert stored.dtype == torch.float32 and torch.equal(t, originals[name]), name
    assert sum(fp8.is_quantized(n) for n in index) > 0
    save_model(loaded, tmp_path / "again")  # a dequantized FP8 model saves unquantized, without the config entry
    assert "quantization_config" not in json.loads((tmp_path / "again" / "config.json").read_text())
    # by default an FP8 checkpoint stays FP8 in memory, and saves back to the same tensors
    held = load_model(tmp_path)
    assert held.layers[1].self_attn.o_proj.weight.dtype == fp8.FP8
    assert held.layers[1].mlp.experts.quantized and held.layers[1].self_attn.kv_b_proj.weight.dtype == torch.float32
    save_model(held, tmp_path / "held", quantization="fp8")
    again = load_file(str(tmp_path / "held" / "model.safetensors"))
    for name, fname in index.items():
        with safe_open(str(tmp_path / fname), "pt") as f:
            assert torch.equal(f.get_tensor(name).view(torch.uint8), again[name].view(torch.uint8)), name
    save_model(held, tmp_path / "held_f32")  # FP8 held weights dequantized on the way out
    assert all(torch.equal(t, u) for (_, t), (_, u) in zip(
        checkpoint_tensors(load_model(tmp_path / "held_f32")), checkpoint_tensors(loaded)))


def _edit(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_damaged_fp8_checkpoints_name_the_tensor(model, tmp_path):
    save_model(model, tmp_path, quantization="fp8")
    file = tmp_path / "model.safetensors"
    good = file.read_bytes()
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    _edit(file, lambda t: t.pop(name + "_scale_inv"))
    with pytest.raises(CheckpointError, match=f"{name}: FP8 weight without its {name}_scale_inv"):
        load_model(tmp_path)
    file.write_bytes(good)
    _edit(file, lambda t: t.update({name + "_scale_inv": torch.ones(3, 3)}))
    with pytest.raises(CheckpointError, match=rf"{name}_scale_inv: file has \[3, 3\]"):
        load_model(tmp_path)
    file.write_bytes(good)
    _edit(file, lambda t: t.update({"model.norm.weight_scale_inv": torch.ones(1, 1)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): model.norm.weight_scale_inv"):
        load_model(tmp_path)
    file.write_bytes(good)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [1, 128]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(fp8.QuantizationError, match="weight_block_size"):
        load_model(tmp_path)


def test_quantize_command_converts_shard_by_shard(model, tmp_path, capsys):
    from dsv2.cli import main

    src = tmp_path / "bf16"
    save_model(model, src, max_shard_size=150_000, dtype=torch.bfloat16)
    (src / "tokenizer.json").write_text("{}")  # copied as it is
    assert main(["quantize", str(src), str(tmp_path / "fp8"), "--no-progress"]) == 0
    assert "tensors in FP8" in capsys.readouterr().out
    out = tmp_path / "fp8"
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "generation_config.json").is_file()
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    assert not list(tmp_path.glob(".fp8.partial-*"))
    direct = tmp_path / "direct"
    save_model(load_model(src), direct, quantization="fp8")
    a, b = load_model(out, quantization="none"), load_model(direct, quantization="none")
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(checkpoint_tensors(a), checkpoint_tensors(b)))
    assert main(["quantize", str(src), str(out)]) == 1  # exists
    assert main(["quantize", str(out), str(tmp_path / "twice")]) == 1  # already quantized
    assert "already quantized" in capsys.readouterr().err


def test_packed_experts_are_written_per_expert(model, tmp_path):
    src = tmp_path / "packed"
    save_model(model, src)
    tensors = load_file(str(src / "model.safetensors"))
    for layer in range(model.config.num_hidden_layers):
        if not model.config.is_moe_layer(layer):
            continue
        prefix = f"model.layers.{layer}.mlp.experts"
        e = model.config.n_routed_experts
        gate = [tensors.pop(f"{prefix}.{i}.gate_proj.weight") for i in range(e)]
        up = [tensors.pop(f"{prefix}.{i}.up_proj.weight") for i in range(e)]
        down = [tensors.pop(f"{prefix}.{i}.down_proj.weight") for i in range(e)]
        tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        tensors[f"{prefix}.down_proj"] = torch.stack(down)
    save_file(tensors, str(src / "model.safetensors"))
    quantize_checkpoint(src, tmp_path / "fp8", progress=False)
    loaded = load_model(tmp_path / "fp8", quantization="none")
    for name, t in checkpoint_tensors(loaded):
        original = dict(checkpoint_tensors(model))[name]
        want = fp8.dequantize(*fp8.quantize(original)) if fp8.is_quantized(name) else original
        assert torch.equal(t, want), name


def test_an_interrupted_conversion_leaves_nothing(model, tmp_path, monkeypatch):
    import dsv2.quantize as q

    src = tmp_path / "bf16"
    save_model(model, src, max_shard_size=150_000)
    calls = []

    def failing_save(data, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        save_file(data, path, metadata=metadata)

    monkeypatch.setattr(q, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, tmp_path / "fp8", progress=False)
    assert not (tmp_path / "fp8").exists() and not list(tmp_path.glob(".fp8.partial-*"))
    shutil.rmtree(src)


def test_info_counts_fp8_weights():
    v2 = preset("deepseek-v2")
    bf16, quantized = model_info(v2)["weights"], model_info(v2, "fp8")["weights"]
    assert bf16["gb"] == pytest.approx(471.5, abs=0.1)  # 235.7B parameters x 2 bytes
    assert quantized["fp8_bytes"] / 1e9 == pytest.approx(234.6, abs=0.1)  # ~236 GB in all with the bf16 parts
    assert quantized["gb"] == pytest.approx(236.9, abs=0.1) and quantized["gb"] / bf16["gb"] < 0.51
    memory = model_info(v2, "fp8", cache_tokens=0)["memory"]
    assert memory["gpus"] == {"80GB": 4, "141GB": 2}  # 236.9 GB at 90% of each
    assert model_info(v2, None, cache_tokens=0)["memory"]["gpus"] == {"80GB": 7, "141GB": 4}


@pytest.mark.gpu
def test_transformers_reads_a_dsv2_fp8_checkpoint(tmp_path):
    """A checkpoint save_model writes in FP8 loads in transformers' fine-grained FP8 path, and its
    greedy tokens are dsv2's greedy choices on the same checkpoint (transformers also quantizes the
    activations, per token and 128 channels, so the logits differ by that rounding: a few percent)."""
    transformers = pytest.importorskip("transformers")
    # its FP8 GEMM is fetched from the Hub by the `kernels` package at first use (docs/quantization.md)
    pytest.importorskip("kernels", reason="transformers' fine-grained FP8 path needs the `kernels` package")
    from .numerics import assert_greedy

    # input widths in whole blocks (transformers' FP8 GEMM tiles K by 128); outputs may end mid-block
    config = tiny_config(hidden_size=256, q_lora_rank=128, kv_lora_rank=128, qk_rope_head_dim=64,
                         qk_nope_head_dim=64, v_head_dim=64, num_attention_heads=2, moe_intermediate_size=128,
                         intermediate_size=256)
    save_model(random_model(config, seed=8, std=0.05), tmp_path, dtype=torch.bfloat16, quantization="fp8")
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda")
    ours = load_model(tmp_path, device="cuda", dtype=torch.float32)
    for seed in range(4):
        prompt = torch.randint(2, config.vocab_size, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
        out = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        # 2^-4 of the largest logit: e4m3's relative rounding of the activations it quantizes
        assert_greedy(ours, prompt, out, ulps=2**-4 / torch.finfo(torch.float32).eps)


# --- weights held in FP8 -----------------------------------------------------------------------------
def test_held_fp8_model_is_the_dequantized_model_on_cpu(model, tmp_path):
    """On CPU an FP8-held model dequantizes each weight per matmul: the same numbers as loading the
    checkpoint dequantized, through another op sequence (the experts' grouped GEMM per expert, the
    gate and up halves of a 160-wide intermediate blocked apart)."""
    save_model(model, tmp_path, quantization="fp8")
    held, plain = load_model(tmp_path), load_model(tmp_path, quantization="none")
    assert held.layers[1].mlp.experts.quantized and not plain.layers[1].mlp.experts.quantized
    held_bytes = sum(p.numel() * p.element_size() for p in held.parameters())
    assert held_bytes < 0.5 * sum(p.numel() * p.element_size() for p in plain.parameters())
    ids = torch.randint(2, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(held(ids), plain(ids), 2**6)  # fp32 sums of the same products, regrouped


def test_bf16_checkpoint_quantized_as_it_loads(model, tmp_path):
    """load_model(quantization="fp8") of a bf16 checkpoint holds the very bytes `dsv2 quantize` writes."""
    save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", progress=False)
    a = load_model(tmp_path / "bf16", quantization="fp8")
    b = load_model(tmp_path / "fp8")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and any(p.dtype == fp8.FP8 for p in pa.values())
    for name, p in pa.items():
        if "kv_b_proj" in name:  # held in bf16: the original here, the checkpoint's FP8 dequantized there
            assert p.dtype == pb[name].dtype == torch.bfloat16
            continue
        assert p.dtype == pb[name].dtype and torch.equal(p.view(torch.uint8), pb[name].view(torch.uint8)), name
    with pytest.raises(ValueError, match="quantization 'int4'"):
        load_model(tmp_path / "bf16", quantization="int4")


def test_llm_serves_the_bundled_model_in_fp8_on_cpu():
    from dsv2 import LLM, SamplingParams
    from dsv2.cli import bundled_model_dir

    from .numerics import assert_greedy

    llm = LLM(bundled_model_dir(), quantization="fp8", max_model_len=256, num_blocks=32)
    assert llm.model.layers[0].self_attn.o_proj.weight.dtype == fp8.FP8
    out = llm.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    prompt = llm.encode("The quick brown fox")[0]
    assert_greedy(llm.model, prompt, out[0].outputs[0].token_ids)  # the engine's tokens are the FP8 model's own
    with pytest.raises(ValueError, match="quantization 'int8'"):
        LLM(bundled_model_dir(), quantization="int8")


@pytest.mark.parametrize("shape", [(3, 128), (5, 200), (2, 1408)])
def test_activation_quantization_against_float64(shape):
    from dsv2.model.kernels.fp8_gemm import act_quant_reference

    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]), dtype=torch.float64)
    x = x * torch.logspace(-3, 2, shape[1], dtype=torch.float64)
    q, s = act_quant_reference(x)
    assert q.dtype == fp8.FP8 and s.shape == (shape[0], math.ceil(shape[1] / 128))
    deq = q.double() * s.double().repeat_interleave(128, 1)[:, : shape[1]]
    group_max = s.double().repeat_interleave(128, 1)[:, : shape[1]] * fp8.FP8_MAX
    # 1 x 128 groups: the relative step of e4m3, below its normals 2^-9 of the group's scale
    assert ((deq - x).abs() <= 2**-4 * x.abs() + 2**-9 * group_max / fp8.FP8_MAX + 2**-20 * x.abs()).all()

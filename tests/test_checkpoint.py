import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv2.checkpoint import CheckpointError, checkpoint_tensors, load_model, save_model

from .conftest import random_model, tiny_config
from .numerics import MODEL_ULPS, assert_close


@pytest.fixture
def model():
    return random_model(tiny_config(), seed=7)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("shard", ["10GB", 200_000])
def test_round_trip_is_bit_exact(model, tmp_path, shard):
    save_model(model, tmp_path, max_shard_size=shard)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (shard == 200_000)
    loaded = load_model(tmp_path)
    assert _same(model, loaded)
    tokens = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))


def test_released_tensor_names(model, tmp_path):
    save_model(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys and "lm_head.weight" in keys
    assert not any(k.startswith("model.layers.1.mlp.experts.gate") for k in keys)


def test_bf16_save_and_dtype_choice(model, tmp_path):
    save_model(model, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert next(load_model(tmp_path).parameters()).dtype == torch.bfloat16
    assert next(load_model(tmp_path, dtype=torch.float32).parameters()).dtype == torch.float32


def test_saved_files_load_in_transformers_with_same_logits(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_model(model, tmp_path, max_shard_size=200_000)
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        assert_close(hf(tokens).logits, model(tokens), MODEL_ULPS)


def test_reads_transformers_save_pretrained(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_model(model, tmp_path / "ours")
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="100KB")
    assert _same(model, load_model(tmp_path / "theirs"))


def test_reads_packed_expert_tensors(model, tmp_path):
    """transformers keeps experts packed ([E, 2I, d] gate|up, [E, d, I]) in memory; a state dict
    saved as it stands (some versions' save_pretrained) uses those names."""
    transformers = pytest.importorskip("transformers")
    save_model(model, tmp_path / "ours")
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    (tmp_path / "packed").mkdir()
    save_file(state, tmp_path / "packed" / "model.safetensors")
    model.config.save(tmp_path / "packed")
    assert _same(model, load_model(tmp_path / "packed"))


# --- every way a checkpoint can be wrong gets an error naming the tensor or file ----------------

def _shards(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def _rewrite(path, edit):
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor(model, tmp_path):
    save_model(model, tmp_path)
    _rewrite(tmp_path / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        load_model(tmp_path)


def test_unexpected_tensor(model, tmp_path):
    save_model(model, tmp_path)
    _rewrite(tmp_path / "model.safetensors", lambda t: t.update({"model.layers.9.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor.*model\.layers\.9\.extra\.weight"):
        load_model(tmp_path)


def test_misshapen_tensor(model, tmp_path):
    save_model(model, tmp_path)
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    _rewrite(tmp_path / "model.safetensors", lambda t: t.update({key: t[key][:-1]}))
    with pytest.raises(CheckpointError, match=r"misshapen.*kv_b_proj.*\[127, 32\].*\[128, 32\]"):
        load_model(tmp_path)


def test_config_disagreeing_with_tensors(model, tmp_path):
    save_model(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_routed_experts"] = 4
    cfg["n_group"] = 2
    cfg["topk_group"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected .*experts\.[4-7]\."):
        load_model(tmp_path)


def test_truncated_shard(model, tmp_path):
    save_model(model, tmp_path, max_shard_size=200_000)
    shard = tmp_path / _shards(tmp_path)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated or corrupt"):
        load_model(tmp_path)


def test_corrupt_header(model, tmp_path):
    save_model(model, tmp_path)
    shard = tmp_path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_model(tmp_path)


def test_index_names_missing_file(model, tmp_path):
    save_model(model, tmp_path, max_shard_size=200_000)
    gone = _shards(tmp_path)[2]
    (tmp_path / gone).unlink()
    with pytest.raises(CheckpointError, match=f"do not exist: {gone}"):
        load_model(tmp_path)


def test_index_points_tensor_at_wrong_file(model, tmp_path):
    save_model(model, tmp_path, max_shard_size=200_000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = _shards(tmp_path)[0]
    assert index["weight_map"]["lm_head.weight"] != first
    index["weight_map"]["lm_head.weight"] = first
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"lm_head.weight in {first}, which does not hold it"):
        load_model(tmp_path)


def test_bad_index_json(model, tmp_path):
    save_model(model, tmp_path, max_shard_size=200_000)
    (tmp_path / "model.safetensors.index.json").write_text("{\"weight_map\": ")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_model(tmp_path)


def test_no_weights_and_no_directory(tmp_path):
    tiny_config().save(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent")


def test_loads_on_meta_first(model, tmp_path, monkeypatch):
    """Loading allocates the model once: nothing is materialized before to_empty."""
    save_model(model, tmp_path)
    sizes = []
    real = torch.nn.Module.to_empty

    def spy(self, *, device, recurse=True):
        sizes.append(sum(p.numel() for p in self.parameters() if p.device.type != "meta"))
        return real(self, device=device, recurse=recurse)

    monkeypatch.setattr(torch.nn.Module, "to_empty", spy)
    load_model(tmp_path)
    assert sizes == [0]


def test_checkpoint_tensor_count(model):
    names = [n for n, _ in checkpoint_tensors(model)]
    assert len(names) == len(set(names))
    experts = [n for n in names if ".mlp.experts." in n]
    assert len(experts) == 2 * 8 * 3  # 2 MoE layers x 8 experts x (gate, up, down)

"""The training loop end to end on a tiny model: learning, exact resume after SIGKILL, damaged
checkpoints, token dropping, plots."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dsv2.checkpoint import load_model
from dsv2.data.corpus import Document
from dsv2.data.prepare import prepare
from dsv2.train.config import TrainConfig
from dsv2.train.loop import Trainer, train
from dsv2.train.plot import plot_run

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
        "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. ")
CODE = "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    docs = [Document(f"doc{i}", (TEXT if i % 2 else CODE) * 6 + str(i), "test") for i in range(60)]
    prepare(out, docs, vocab_size=320, val_fraction=0.1, workers=1)
    return out


def tiny(data_dir, out, **kw):
    base = dict(model="dsv2-tiny", model_overrides={"vocab_size": 320}, data=str(data_dir), seq_len=32,
                max_tokens=32 * 8 * 20, batch_start=8, batch_end=8, micro_batch=4, lr=3e-3, warmup_steps=5,
                out=str(out), log_every=1, eval_every=10, eval_batches=2, checkpoint_every=10,
                progress=False, init_std=0.02, device="cpu")
    return TrainConfig(**{**base, **kw})


def metrics(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def test_training_learns_and_logs(data_dir, tmp_path):
    summary = train(tiny(data_dir, tmp_path, max_tokens=32 * 8 * 40, ramp_tokens=32 * 8 * 10, batch_start=4,
                         capacity_factor=1.0))
    m = metrics(tmp_path)
    assert m[40]["ce"] < m[1]["ce"] - 1.0
    assert {"loss", "ce", "expert", "device", "comm", "lr", "grad_norm", "tokens_per_s", "expert_load",
            "dropped_fraction"} <= set(m[40])
    assert m[1]["batch_size"] == 4 and m[40]["batch_size"] == 8  # the ramp
    assert len(m[1]["expert_load"]) == 2 and len(m[1]["expert_load"][0]) == 8
    assert 0 < m[1]["dropped_fraction"] < 0.5
    assert "val_loss" in summary and summary["val_ppl"] > 1
    final = load_model(tmp_path / "checkpoints" / "step-00000040" / "model")
    assert final.config.vocab_size == 320


def test_lr_schedule_in_the_loop(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path, warmup_steps=4, lr=1e-3))
    m = metrics(tmp_path)
    assert m[1]["lr"] == pytest.approx(1e-3 / 4)
    assert m[10]["lr"] == pytest.approx(1e-3)
    assert m[13]["lr"] == pytest.approx(1e-3 * 0.316)  # 60% of 20 steps' tokens seen after step 12
    assert m[19]["lr"] == pytest.approx(1e-3 * 0.316 ** 2)


def _config_file(tmp_path, data_dir, out, max_steps):
    path = tmp_path / f"{out.name}.toml"
    path.write_text("\n".join([
        'model = "dsv2-tiny"', f'data = "{data_dir}"', "seq_len = 32", f"max_tokens = {32 * 8 * max_steps}",
        "batch_start = 8", "batch_end = 8", "micro_batch = 4", "lr = 3e-3", "warmup_steps = 5",
        f'out = "{out}"', "log_every = 1", "eval_every = 1000", "eval_batches = 1", "checkpoint_every = 10",
        "progress = false", "init_std = 0.02", 'device = "cpu"', "keep_checkpoints = 2",
        "[model_overrides]", "vocab_size = 320"]))
    return path


def _dsv2(*args):
    return subprocess.Popen([sys.executable, "-m", "dsv2", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_is_bit_exact(data_dir, tmp_path):
    steps = 30  # a checkpoint every 10: killed past step 14, resumed from step 10
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    ref = _dsv2("train", "--config", str(_config_file(tmp_path, data_dir, whole, steps)))
    cfg = _config_file(tmp_path, data_dir, broken, steps)
    proc = _dsv2("train", "--config", str(cfg))
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a checkpoint exists and the run is past it
        done = (broken / "metrics.jsonl").exists() and len(
            (broken / "metrics.jsonl").read_text().splitlines()) >= 14
        if done and (broken / "checkpoints" / "step-00000010").exists():
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(metrics(broken))
    assert killed_at < steps, "the run finished before it could be killed"
    resumed = _dsv2("train", "--config", str(cfg), "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in out + err
    ref.communicate(timeout=300)
    a, b = metrics(whole), metrics(broken)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert all(a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"] for s in a)
    wa = load_model(whole / "checkpoints" / f"step-{steps:08d}" / "model").state_dict()
    wb = load_model(broken / "checkpoints" / f"step-{steps:08d}" / "model").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_damaged_checkpoint_falls_back_to_the_previous(data_dir, tmp_path, capsys):
    train(tiny(data_dir, tmp_path, max_tokens=32 * 8 * 30))
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-00000010", "step-00000020", "step-00000030"]
    shard = ckpts[-1] / "model" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    trainer = Trainer(tiny(data_dir, tmp_path, max_tokens=32 * 8 * 30), resume=True)
    err = capsys.readouterr().err
    assert "step-00000030 is damaged" in err and "model/model.safetensors" in err
    assert trainer.step == 20
    assert max(metrics(tmp_path)) == 20  # the log is cut back to the checkpoint


def test_fresh_run_refuses_a_directory_with_checkpoints(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path))
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        Trainer(tiny(data_dir, tmp_path))


def test_resume_without_checkpoint_starts_fresh(data_dir, tmp_path, capsys):
    trainer = Trainer(tiny(data_dir, tmp_path), resume=True)
    assert trainer.step == 0 and "starting from scratch" in capsys.readouterr().out


def test_token_dropping_only_in_training(data_dir, tmp_path):
    trainer = Trainer(tiny(data_dir, tmp_path, capacity_factor=0.5))
    inputs, _ = trainer.train_data.next_batch(4)
    out = trainer.model(inputs, return_router=True, drop=trainer._drop(4))
    kept = out.router[0].kept
    assert kept is not None and not kept.all()
    trainer.model.eval()
    assert trainer.model(inputs, return_router=True, drop=trainer._drop(4)).router[0].kept is None


def test_vocab_mismatch_is_clear(data_dir, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        Trainer(tiny(data_dir, tmp_path, model_overrides={"vocab_size": 100}))


def test_plot_writes_pngs(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path))
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "expert_load.png"]
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = [")
    with pytest.raises(ValueError, match="invalid TOML"):
        TrainConfig.load(bad)
    bad.write_text("learning_rate = 1.0")
    with pytest.raises(ValueError, match="unknown train config key.*learning_rate"):
        TrainConfig.load(bad)
    with pytest.raises(ValueError, match="'lr'"):
        TrainConfig.load(None, ["lr=fast"])


def test_init_from_extends_a_models_context(data_dir, tmp_path):
    """init_from: a trained model's weights start a run whose config changes the rope (YaRN from x4
    to x16 of the original window, trained at twice the length), as the paper extends its context;
    the weights are the model's, and the run writes its model with the new config."""
    import json

    import torch

    from dsv2.checkpoint import load_model
    from dsv2.train.config import TrainConfig
    from dsv2.train.loop import Trainer, train

    base = tmp_path / "base"
    train(TrainConfig.load(_config_file(tmp_path, data_dir, base, 10)))
    start = base / "checkpoints" / "step-00000010" / "model"
    yarn = ("{type = 'yarn', factor = 16.0, original_max_position_embeddings = 256, beta_fast = 32, "
            "beta_slow = 1, mscale = 0.707, mscale_all_dim = 0.707}")
    ext = tmp_path / "ext"
    extend = [f"init_from={json.dumps(str(start))}", "seq_len=64", f"model_overrides.rope_scaling={yarn}",
              "model_overrides.max_position_embeddings=4096"]
    cfg = TrainConfig.load(_config_file(tmp_path, data_dir, ext, 2), extend)
    trainer = Trainer(cfg)
    want = load_model(start, dtype=torch.float32, quantization="none").state_dict()
    got = trainer.model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want if "rotary" not in k)
    assert trainer.mc.rope_scaling.factor == 16 and trainer.mc.max_position_embeddings == 4096
    trainer.run()
    saved = json.loads((ext / "checkpoints" / "step-00000001" / "model" / "config.json").read_text())
    scaling = saved.get("rope_scaling") or saved.get("rope_parameters")
    assert scaling["factor"] == 16 and saved["max_position_embeddings"] == 4096
    wider = TrainConfig.load(_config_file(tmp_path, data_dir, tmp_path / "wide", 2),
                             [f"init_from={json.dumps(str(start))}", "model_overrides.num_hidden_layers=1"])
    with pytest.raises(ValueError, match="model_overrides change its tensors"):
        Trainer(wider)

"""bench/ablations.py end to end at tiny sizes on the CPU: every variant of every suite builds at
equal activated parameters, trains, is evaluated and lands in the table, the plot and the JSON; a
finished run is read back, not trained again."""

from __future__ import annotations

import json

import pytest

from bench import ablations
from dsv2.checkpoint import load_model

from .test_train import data_dir  # noqa: F401


def test_variants_match_activated_parameters():
    bench = ablations
    for suite in bench.SUITES:
        found = {name: bench._activated(fields) for name, (fields, _) in bench.variants(suite, bench.FULL, 8192).items()}
        low, high = min(found.values()), max(found.values())
        # the attention suite sets each dense FFN's width; the MoE variants activate the same FFN
        # width and differ only by their routers
        assert (high - low) / high < 0.01, (suite, found)
    attention = bench.variants("attention", bench.FULL, 8192)
    kv = {name: bench._config(fields).num_key_value_heads for name, (fields, _) in attention.items()}
    assert kv["MHA"] == 8 and kv["MQA"] == 1 and kv["GQA (2 KV heads)"] == 2


def test_suites_train_and_report(data_dir, tmp_path):  # noqa: F811
    bench = ablations
    results = bench.main(["--suite", "attention,moe", "--smoke", "--data", str(data_dir), "--out", str(tmp_path),
                          "--device", "cpu"])
    assert set(results) == {"attention", "moe"}
    for suite in ("attention", "moe"):
        assert (tmp_path / f"{suite}.png").stat().st_size > 0
        rows = (tmp_path / f"{suite}.md").read_text().splitlines()
        assert len([r for r in rows if r.startswith("| ") and "variant" not in r]) == len(results[suite]["variants"])
    att = results["attention"]["variants"]
    bytes_ = {name: r["kv_bytes_per_token"] for name, r in att.items()}
    # bf16 bytes per token over 2 layers, heads of 8: MHA K and V of 8 heads, GQA of 2, MQA of 1;
    # MLA a latent of 4 head dims and a rope key of half a head dim
    assert bytes_ == {"MHA": 2 * 2 * (2 * 8 * 8), "GQA (2 KV heads)": 2 * 2 * (2 * 2 * 8), "MQA": 2 * 2 * (2 * 8),
                      "MLA": 2 * 2 * (4 * 8 + 4)}
    assert all(r["val_loss"] < 6 and r["tokens_per_s"] > 0 for r in att.values())
    for name in att:  # each variant's final checkpoint loads as the model it trained
        (ckpt,) = (tmp_path / "attention" / ablations._slug(name) / "seed0" / "checkpoints").glob("step-*")
        model = load_model(ckpt / "model")
        assert model.config.attention_type == ("mla" if name == "MLA" else "mha")
        assert model.config.num_key_value_heads == {"MHA": 8, "MQA": 1}.get(name, 2 if name.startswith("GQA") else 8)
    moe = results["moe"]["variants"]
    assert moe["DeepSeekMoE (2 shared + 6 of 32)"]["expert_imbalance"] >= 1 and "expert_imbalance" not in moe["dense"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["moe"]["variants"]["dense"]["val_loss"] == moe["dense"]["val_loss"]
    # finished runs are read back: a second call trains nothing
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "train", lambda cfg: pytest.fail("a finished run was trained again"))
        again = bench.main(["--suite", "moe", "--smoke", "--data", str(data_dir), "--out", str(tmp_path),
                            "--device", "cpu"])
    assert again["moe"]["variants"]["dense"]["val_loss"] == moe["dense"]["val_loss"]

"""The paper's context extension in miniature: pre-train short, extend with YaRN, compare.

    python bench/long_context.py --out runs/longctx            # the full run (a GPU)
    python bench/long_context.py --out /tmp/longctx --smoke    # tiny sizes, a few CPU minutes

DeepSeek-V2 is pre-trained at 4K, extended to 128K with YaRN (s = 40, alpha = 1, beta = 32, the
attention scale times 0.0707 ln s + 1) and trained 1,000 steps at 32K. Here, at a size that fits:
1. data: the built-in corpus plus synthetic retrieval documents (`dsv2 data prepare --retrieval`,
   a pass key planted in the corpus's text and asked for at the end) that fit the base length;
2. base: configs/longctx_base.toml, `dsv2 train` at seq_len L;
3. from the base checkpoint (`init_from`), the extended models: YaRN with s = 16 and the paper's
   alpha, beta and attention-scale formula, without and with a short fine-tune at 4L on retrieval
   documents of up to 4L (configs/longctx_extend.toml); the same with plain position
   interpolation (rope type "linear") as the ablation;
4. for each model: needle in a haystack over lengths L/2 .. 16L x 5 depths (pass-key needles with
   keys no training document used), and perplexity of a long text (the stdlib docstrings) at
   windows L/2 .. 16L.
Writes results.json, niah_<model>.png and ppl_vs_length.png under --out. Every step whose output
exists is skipped, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv2.checkpoint import load_model, save_model  # noqa: E402
from dsv2.config import ModelConfig  # noqa: E402
from dsv2.data.retrieval import pass_key  # noqa: E402
from dsv2.eval.lm import EvalModel  # noqa: E402
from dsv2.eval.niah import default_filler, run_niah  # noqa: E402
from dsv2.eval.perplexity import run_perplexity  # noqa: E402
from dsv2.tokenizer import Tokenizer  # noqa: E402

# the paper's YaRN settings at a scale factor that fits here
YARN = {"type": "yarn", "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
FULL = dict(base_len=1024, factor=16, retrieval=20_000, base_args=[], extend_args=[], trials=4)
SMOKE = dict(base_len=64, factor=4, retrieval=200, trials=1,
             base_args=["model_overrides.num_hidden_layers=2", "max_tokens=20480", "batch_start=8", "batch_end=8",
                        "micro_batch=8", "warmup_steps=5", "eval_batches=2", "device=cpu"],
             extend_args=["max_tokens=4096", "batch_start=4", "batch_end=4", "micro_batch=4", "device=cpu"])


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _rope(kind: str, factor: int, base_len: int) -> dict:
    if kind == "linear":
        return {"type": "linear", "factor": float(factor)}
    return {**YARN, "factor": float(factor), "original_max_position_embeddings": base_len}


def _toml(value: dict) -> str:
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + "}"


def _with_config(source: Path, dest: Path, **changes) -> None:
    """source's weights under its config with `changes` (the same tensors)."""
    config = ModelConfig.from_hf(source).replace(**changes)
    save_model(load_model(source, quantization="none", config=config), dest)


def _last_model(run: Path) -> Path:
    steps = sorted((run / "checkpoints").glob("step-*"))
    if not steps:
        raise RuntimeError(f"{run}: no checkpoint")
    return steps[-1] / "model"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU check of the whole pipeline")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    s = SMOKE if args.smoke else FULL
    L, factor = s["base_len"], s["factor"]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "dsv2"]

    data = out / "data"
    if not (data / "meta.json").exists():  # retrieval documents of up to the base length (about 4 chars a token)
        _run([*py, "data", "prepare", "--builtin", "--tokenizer", str(ROOT / "dsv2/bundled"), "--out", str(data),
              "--retrieval", str(s["retrieval"]), "--retrieval-chars", f"{L},{3 * L}"])
    base = out / "base"
    if not (base / "checkpoints").exists():
        _run([*py, "train", "--config", str(ROOT / "configs/longctx_base.toml"), f"out={json.dumps(str(base))}",
              f"data={json.dumps(str(data))}", f"seq_len={L}", f"model_overrides.max_position_embeddings={L}",
              *s["base_args"]])
    base_model = _last_model(base)
    long_data = out / "data_long"
    if not (long_data / "meta.json").exists():  # the fine-tune's: retrieval documents of up to 4L
        _run([*py, "data", "prepare", "--builtin", "--tokenizer", str(ROOT / "dsv2/bundled"), "--out",
              str(long_data), "--retrieval", str(s["retrieval"] // 4), "--retrieval-chars", f"{4 * L},{12 * L}"])

    # the base model read past its window as it is (RoPE extrapolated): where retrieval breaks down
    extrapolated = out / "base_extrapolated"
    if not (extrapolated / "config.json").exists():
        _with_config(base_model, extrapolated, max_position_embeddings=factor * L)
    models = {"base": extrapolated}
    for kind in ("yarn", "linear"):
        rope = _rope(kind, factor, L)
        plain = out / f"{kind}_no_ft"
        if not (plain / "config.json").exists():  # the base weights under the new rope: config only
            _with_config(base_model, plain, rope_scaling=rope, max_position_embeddings=factor * L)
        models[f"{kind}_no_ft"] = plain
        tuned = out / f"{kind}_ft"
        if not (tuned / "checkpoints").exists():
            _run([*py, "train", "--config", str(ROOT / "configs/longctx_extend.toml"), f"out={json.dumps(str(tuned))}",
                  f"data={json.dumps(str(long_data))}", f"init_from={json.dumps(str(base_model))}",
                  f"seq_len={4 * L}", f"model_overrides.rope_scaling={_toml(rope)}",
                  f"model_overrides.max_position_embeddings={factor * L}", *s["extend_args"]])
        models[f"{kind}_ft"] = _last_model(tuned)

    # (a haystack needs room for filler beside the needle and question: 64 tokens at least)
    lengths = [n for n in (L // 2, L, 2 * L, 4 * L, 8 * L, 16 * L) if n >= 64]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(default_filler())
        text = f.name
    tokenizer = Tokenizer.from_dir(data)  # the one the data was prepared with (and the bundled model's)
    results = {"base_len": L, "factor": factor, "lengths": lengths, "models": {}}
    for name, path in models.items():
        model = EvalModel(path, tokenizer, device=args.device, batch_size=8)
        cap = model.max_len
        usable = [n for n in lengths if n + 16 <= cap]
        niah = run_niah(model, lengths=usable, trials=s["trials"], heatmap=out / f"niah_{name}.png",
                        needles=lambda rng: pass_key(rng), seed=random.Random(name).randint(0, 10**6))
        ppl = {n: run_perplexity(model, text, window=n, limit=4 * max(usable))["metrics"]["perplexity"]
               for n in usable if n <= cap}
        results["models"][name] = {"path": str(path), "max_len": cap, "niah": niah["grid"],
                                   "niah_accuracy": niah["metrics"]["accuracy"], "perplexity": ppl}
        print(f"{name}: NIAH {niah['metrics']['accuracy']:.2f}; perplexity "
              + ", ".join(f"{n}: {v:.2f}" for n, v in ppl.items()), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot_perplexity(results, out / "ppl_vs_length.png")
    return results


def _plot_perplexity(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, r in results["models"].items():
        lengths = sorted(int(n) for n in r["perplexity"])
        ax.plot(lengths, [r["perplexity"][n] for n in lengths], marker="o", label=name)
    ax.axvline(results["base_len"], color="grey", linestyle=":", label="pre-training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context window (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity against context length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""The distributed training path on one GPU against the single-process one: no regression.

    python bench/train_dist_bench.py --out bench/results/train_dist_h200.json [--preset dsv2-1b-lite]

Three rows on the same GPU, in one run, with the same model, batch and sequence length:
- `bench/train_bench.py`'s dsv2 step (the figure bench/RESULTS.md carries for training);
- `python -m dsv2 train`: the training loop in one process (whole model compiled);
- `torchrun --nproc-per-node 1 -m dsv2 train`: the loop under torchrun, in a NCCL process group of
  one (which trains without FSDP2's wrapping unless parallel.cpu_offload asks for it).
The loop rows train on the built-in corpus (`dsv2 data prepare --builtin`); their tokens/s is the
loop's own (metrics.jsonl), over the windows after the first (which holds compilation). MFU counts
as train_bench does (6 x activated parameters + attention, over the dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_bench import PEAK_BF16, flops_per_token  # noqa: E402
from dsv2.config import preset  # noqa: E402


def _loop_config(tmp: Path, args) -> Path:
    tokens = args.steps * args.micro_batch * args.seq_len
    path = tmp / "bench.toml"
    path.write_text("\n".join([
        f'model = "{args.preset}"', f'data = "{args.data}"', f"seq_len = {args.seq_len}", f"max_tokens = {tokens}",
        f"batch_start = {args.micro_batch}", f"batch_end = {args.micro_batch}", f"micro_batch = {args.micro_batch}",
        "lr = 3e-4", "warmup_steps = 5", 'device = "cuda"', "compile = true", f"log_every = {args.window}",
        "eval_every = 1000000", "eval_batches = 1", "checkpoint_every = 1000000", "progress = false"]))
    return path


def loop_row(name: str, launcher: list[str], config: Path, out: Path, flops: float, peak: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([*launcher, "train", "--config", str(config), f"out={json.dumps(str(out))}"],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"row": name, "status": "failed", "stderr": proc.stderr[-3000:]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    tok_s = sorted(windows)[len(windows) // 2]
    return {"row": name, "status": "ok", "tok_s": tok_s, "windows_tok_s": windows, "mfu": tok_s * flops / peak,
            "wall_s": time.perf_counter() - start, "final_loss": records[-1].get("loss")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="dsv2-1b-lite")
    ap.add_argument("--micro-batch", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--window", type=int, default=5, help="steps per tokens/s window")
    ap.add_argument("--data", type=Path, default=ROOT / "data/builtin")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/train_dist_h200.json")
    args = ap.parse_args(argv)
    config = preset(args.preset)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
    flops = flops_per_token(config, args.seq_len)
    res = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "args": {k: str(v) for k, v in vars(args).items()}, "peak_bf16": peak, "flops_per_token": flops, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        step_json = tmp / "train_bench.json"
        proc = subprocess.run([sys.executable, str(ROOT / "bench/train_bench.py"), "--preset", args.preset, "--compile",
                               "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len), "--skip-hf",
                               "--out", str(step_json)], capture_output=True, text=True)
        if proc.returncode == 0:
            step = json.loads(step_json.read_text())
            res["train_bench"] = step
            tok_s = next(iter(step["rows"].values()))["tokens_per_s"]  # dsv2's row (no transformers row)
            res["rows"].append({"row": "train_bench.py step", "status": "ok", "tok_s": tok_s, "mfu": tok_s * flops / peak})
        else:
            res["rows"].append({"row": "train_bench.py step", "status": "failed", "stderr": proc.stderr[-3000:]})
        config_path = _loop_config(tmp, args)
        res["rows"].append(loop_row("dsv2 train, one process", [sys.executable, "-m", "dsv2"], config_path,
                                    tmp / "one", flops, peak))
        res["rows"].append(loop_row("torchrun --nproc-per-node 1 (NCCL)",
                                    [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", "1", "-m", "dsv2"], config_path, tmp / "fsdp", flops, peak))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str))
    print(f"\n{name}, {args.preset}, micro-batch {args.micro_batch} x {args.seq_len}, peak {peak / 1e12:.0f} TFLOP/s")
    print(f"{'row':<46}{'tok/s':>10}{'MFU':>8}")
    for r in res["rows"]:
        if r["status"] == "ok" and r.get("tok_s"):
            print(f"{r['row']:<46}{r['tok_s']:>10,.0f}{r['mfu']:>8.1%}")
        else:
            print(f"{r['row']:<46}  {r['status']}: {r.get('stderr', '')[-300:]}")
    return res


if __name__ == "__main__":
    main()

"""The engine's host work per decode row per step: scheduling, input packing, sampling's host side,
reading back the tokens and building outputs. At large batches a step's host work grows with its
rows in Python; under async scheduling it is hidden only while it is shorter than the device's step.

    python bench/host_bench.py                      # batches 256, 1,024, 4,096; ~1 minute on a CPU
    python bench/host_bench.py --batches 1024 --steps 50 --out bench/results/host_bench_cpu.json

A one-layer dsv2-tiny model on the CPU, so that the model's forward is short and measured apart
(every call of ModelRunner.forward timed and subtracted); eager, synchronous steps. Each batch is
run with output_kind "cumulative" (an output per request per step, a server's streams) and
"final_only" (LLM.generate's). The budget beside it: the device's time per decode row at batch
1,024 in the engine's maxtp run (bench/results/engine_bench_maxtp_h200.json), the time host work
must stay under to be hidden. The host here is this machine's CPU, not the GPU machine's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dsv2.checkpoint import random_model  # noqa: E402
from dsv2.config import preset  # noqa: E402
from dsv2.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from dsv2.engine import runner as runner_module  # noqa: E402

MAXTP = ROOT / "bench/results/engine_bench_maxtp_h200.json"


def device_budget() -> dict | None:
    """The device's ms per step and rows per step of V2-Lite's maxtp run, if on record."""
    if not MAXTP.exists():
        return None
    row = json.loads(MAXTP.read_text())["max_throughput"]["models"]["deepseek-v2-lite"]
    return {"us_per_row": row["ms_per_step"] * 1e3 / row["decode_rows_mean"], "rows": row["decode_rows_mean"],
            "source": str(MAXTP.relative_to(ROOT))}


def measure(model, batch: int, kind: str, steps: int, forward_time: list[float]) -> dict:
    engine = LLMEngine(model, None, EngineConfig(block_size=16, num_blocks=batch * 5 + 8, max_model_len=64 + steps,
                                                 max_num_seqs=batch, max_num_batched_tokens=batch * 16,
                                                 enforce_eager=True, async_scheduling=False))
    params = SamplingParams(temperature=0.0, max_tokens=steps + 12, ignore_eos=True, output_kind=kind)
    for i in range(batch):
        engine.add_request(str(i), [3 + i % 100] * 8, params)
    for _ in range(10):  # the prefills and a few decodes
        engine.step()
    forward_time[0] = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step = (time.perf_counter() - start) / steps
    model_s = forward_time[0] / steps
    return {"batch": batch, "output_kind": kind, "step_ms": step * 1e3, "forward_ms": model_s * 1e3,
            "host_ms": (step - model_s) * 1e3, "host_us_per_row": (step - model_s) * 1e6 / batch}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="256,1024,4096")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/host_bench_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = random_model(preset("dsv2-tiny", num_hidden_layers=1), "cpu", torch.float32)
    forward_time = [0.0]
    plain = runner_module.ModelRunner.forward

    def timed(self, *a, **k):
        t = time.perf_counter()
        out = plain(self, *a, **k)
        forward_time[0] += time.perf_counter() - t
        return out

    runner_module.ModelRunner.forward = timed
    try:
        rows = [measure(model, int(b), kind, args.steps, forward_time)
                for b in args.batches.split(",") for kind in ("cumulative", "final_only")]
    finally:
        runner_module.ModelRunner.forward = plain
    budget = device_budget()
    res = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu(), "torch": torch.__version__, "rows": rows,
           "device_budget": budget}
    print(f"\nhost work per decode row, {res['cpu']}; forward excluded")
    print(f"{'batch':>7}{'output_kind':>13}{'step ms':>10}{'forward ms':>12}{'host ms':>10}{'host us/row':>13}")
    for r in rows:
        print(f"{r['batch']:>7}{r['output_kind']:>13}{r['step_ms']:>10.1f}{r['forward_ms']:>12.1f}"
              f"{r['host_ms']:>10.1f}{r['host_us_per_row']:>13.1f}")
    if budget:
        print(f"device budget: {budget['us_per_row']:.1f} us per row (V2-Lite decode at {budget['rows']:.0f} rows, "
              f"{budget['source']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"JSON: {args.out}")
    return res


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()

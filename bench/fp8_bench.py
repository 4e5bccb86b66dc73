"""What FP8 weights cost in quality: the bundled model's teacher-forced perplexity and logit error
with its weights stored as `dsv2 quantize --method fp8` stores them, against its released bf16
weights (the precision FP8 replaces in serving).

Method: the checkpoint is written by save_model(quantization="fp8") and read back by load_model,
the path every FP8 checkpoint takes (the weights held in FP8, each dequantized from its 128 x 128
block scales for its matmul on the CPU), so the numbers are those of the format itself; the forward
then runs in float32 without rounding the activations, so they hold the weights' error alone. Windows: the built-in validation split (see kv_quant_bench.windows).

    PYTHONPATH=. python3 bench/fp8_bench.py --out bench/results/fp8_quality_cpu.json
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time

import torch
import torch.nn.functional as F

from bench.kv_quant_bench import window_parser, windows
from dsv2.checkpoint import load_model, save_model
from dsv2.cli import bundled_model_dir


@torch.inference_mode()
def logits(model, rows: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(rows[i:i + batch, :-1]).float() for i in range(0, len(rows), batch)])


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> dict:
    nll = F.cross_entropy(got.flatten(0, 1), targets.flatten()).item()
    diff = (got - ref).flatten(0, 1)
    per_pos = diff.abs().amax(-1) / ref.flatten(0, 1).abs().amax(-1)
    return {"weights": name, "perplexity": math.exp(nll), "rel_l2": (diff.norm() / ref.norm()).item(),
            "max_rel": per_pos.max().item(), "mean_abs": diff.abs().mean().item(),
            "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def main() -> None:
    args = window_parser(__doc__).parse_args()
    begin = time.time()
    rows, source = windows(args.seq_len, args.windows)
    targets = rows[:, 1:]
    reference = load_model(bundled_model_dir(), dtype=torch.float32)
    ref = logits(reference, rows, args.batch)
    results = [compare("bf16 (the checkpoint)", ref, ref, targets)]
    with tempfile.TemporaryDirectory() as tmp:
        save_model(reference, tmp, quantization="fp8")
        quantized = load_model(tmp, dtype=torch.float32)
    results.append(compare("fp8 (128 x 128 blocks)", logits(quantized, rows, args.batch), ref, targets))
    base = results[0]["perplexity"]
    print(f"bundled model, {len(rows)} windows x {args.seq_len} tokens of {source}; float32 forward")
    print(f"{'weights':<24}{'perplexity':>11}{'change':>9}{'rel L2':>9}{'max rel':>9}{'mean |d|':>10}{'argmax':>8}")
    for r in results:
        r["change"] = r["perplexity"] / base - 1
        print(f"{r['weights']:<24}{r['perplexity']:>11.3f}{r['change']:>+9.3%}{r['rel_l2']:>9.4f}{r['max_rel']:>9.3f}"
              f"{r['mean_abs']:>10.4f}{r['argmax_agreement']:>8.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"source": source, "windows": len(rows), "seq_len": args.seq_len, "results": results,
                       "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                       "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - begin, 1)}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

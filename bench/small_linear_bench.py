"""Few-row linear layers at the DeepSeek-V2-Lite shapes: the Triton kernel (kernels/small_linear.py)
against cuBLAS (F.linear), beside the bandwidth limit (weight bytes / copy bandwidth measured in the
same run). Each projection has one weight per layer (27 copies, past the 50 MB L2, as in a decode
step), and the calls run back to back in a CUDA graph, as in the engine's captured steps.

    python bench/small_linear_bench.py --out bench/results/small_linear_bench_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv2.model.kernels.small_linear import small_linear  # noqa: E402

# (name, out features, in features, second weight's out features or 0)
SHAPES = [("q_proj + kv_a_proj_with_mqa", 3072, 2048, 576), ("q_proj", 3072, 2048, 0),
          ("kv_a_proj_with_mqa", 576, 2048, 0), ("o_proj", 2048, 2048, 0),
          ("dense gate + up", 10944, 2048, 10944), ("dense down", 2048, 10944, 0), ("lm_head", 102400, 2048, 0)]


def copy_bandwidth() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


def per_call_us(fn, layers: int, reps: int = 20) -> float:
    """Median microseconds per call of fn(layer) captured `layers` times in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, cuBLAS picks) outside the capture
        for i in range(layers):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn(i)
    ms = triton.testing.do_bench(graph.replay, rep=reps * 10, return_mode="median")
    return ms * 1e3 / layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4")
    ap.add_argument("--out", type=Path, default=Path("bench/results/small_linear_bench_h100.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth": bandwidth,
           "rows": []}
    print(f"{res['device']}, copy bandwidth {bandwidth / 1e9:,.0f} GB/s")
    print(f"{'projection':30} {'M':>2} {'cuBLAS us':>10} {'dsv2 us':>8} {'limit us':>9} {'dsv2 % of limit':>16}")
    with torch.no_grad():
        for name, n, k, n2 in SHAPES:
            nbytes = (n + n2) * k * 2
            layers = max(2, min(27, int(2e9 // nbytes)))  # well past L2, within 2 GB
            w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
            w2 = [torch.randn(n2, k, device="cuda", dtype=torch.bfloat16) for _ in range(layers)] if n2 else None
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                pair = (lambda i: (w[i], w2[i])) if n2 else (lambda i: (w[i],))
                ours = per_call_us(lambda i: small_linear(x, *pair(i)), layers)
                theirs = per_call_us(lambda i: [F.linear(x, wi) for wi in pair(i)], layers)
                limit = nbytes / bandwidth * 1e6
                row = {"name": name, "m": m, "n": n, "n2": n2, "k": k, "cublas_us": theirs, "dsv2_us": ours,
                       "limit_us": limit}
                res["rows"].append(row)
                print(f"{name:30} {m:2d} {theirs:10.2f} {ours:8.2f} {limit:9.2f} {100 * limit / ours:15.0f}%")
            del w, w2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

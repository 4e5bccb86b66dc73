"""MLA decode attention over the paged latent cache: the Triton kernel against the PyTorch
gather-then-attend path, beside the bandwidth limit (cache bytes read / copy bandwidth measured
in the same run). DeepSeek-V2-Lite shape: 16 heads, latent 512 + rope 64, bf16, 64-token pages.

    python bench/mla_decode_bench.py --out mla_decode_bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv2.engine.kernels.mla_decode import mla_decode  # noqa: E402


def gather_attend(q_lat, q_rope, kv, tables, lens, scale, r):
    """What the engine does without the kernel: gather each row's pages, attend densely."""
    rows = kv[tables.long()].flatten(1, 2)  # [B, T, r + dr]
    t = rows.shape[1]
    scores = (torch.einsum("bhr,btr->bht", q_lat, rows[..., :r]) +
              torch.einsum("bhd,btd->bht", q_rope, rows[..., r:])).float() * scale
    mask = torch.arange(t, device=kv.device)[None, None] < lens[:, None, None]
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(kv.dtype)
    return torch.einsum("bht,btr->bhr", p, rows[..., :r])


def copy_bandwidth() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("mla_decode_bench.json"))
    args = ap.parse_args()
    h, r, dr, bs = 16, 512, 64, 64
    bw = copy_bandwidth()
    rows = []
    for b, ctx in [(1, 1024), (1, 16384), (16, 1024), (64, 1024), (256, 1024), (64, 4096)]:
        nblk = ctx // bs
        kv = torch.randn(b * nblk + 1, bs, r + dr, device="cuda", dtype=torch.bfloat16)
        tables = torch.randperm(b * nblk, device="cuda").int().view(b, nblk)
        lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        q_lat = torch.randn(b, h, r, device="cuda", dtype=torch.bfloat16)
        q_rope = torch.randn(b, h, dr, device="cuda", dtype=torch.bfloat16)
        scale = 192 ** -0.5
        t_kernel = triton.testing.do_bench(lambda: mla_decode(q_lat, q_rope, kv, tables, lens, scale, r),
                                           return_mode="median")
        t_torch = triton.testing.do_bench(lambda: gather_attend(q_lat, q_rope, kv, tables, lens, scale, r),
                                          return_mode="median")
        nbytes = b * ctx * (r + dr) * 2
        rows.append({"batch": b, "context": ctx, "kernel_us": t_kernel * 1e3, "torch_us": t_torch * 1e3,
                     "limit_us": nbytes / bw * 1e6, "kernel_gbs": nbytes / (t_kernel * 1e-3) / 1e9})
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "copy_bandwidth_gbs": bw / 1e9, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"MLA decode, 16 heads, 576-wide bf16 latent rows, {result['device']}; copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'batch':>6}{'context':>9}{'triton us':>11}{'torch us':>10}{'limit us':>10}{'GB/s':>8}{'of limit':>10}")
    for x in rows:
        print(f"{x['batch']:>6}{x['context']:>9}{x['kernel_us']:>11.1f}{x['torch_us']:>10.1f}{x['limit_us']:>10.1f}"
              f"{x['kernel_gbs']:>8.0f}{x['limit_us'] / x['kernel_us'] * 100:>9.0f}%")


if __name__ == "__main__":
    main()

"""Where a training step's GPU time goes: torch.profiler's kernel table for one preset.

    python bench/profile_train.py [--preset dsv2-1b-moe] [--micro-batch 8] [--seq-len 2048] [--compile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_bench import dsv2_step_fn  # noqa: E402
from dsv2.config import preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dsv2-1b-moe")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    config = preset(args.preset, torch_dtype="float32")
    data = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1)).cuda()
    step = dsv2_step_fn(config, data[:, :-1], data[:, 1:], args.compile)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            with record_function("train_step"):
                step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()

"""Training throughput and MFU for a ~1B-total MoE (preset dsv2-1b-moe), dsv2 against
transformers' DeepseekV2ForCausalLM on the same config and batch, beside the physical limit.

    python bench/train_bench.py --out train_bench.json [--steps 20] [--micro-batch 8] [--seq-len 2048]

Both sides run full training steps: bf16 autocast forward, loss, backward, gradient clipping and
a fused AdamW step, fp32 master weights, random tokens. dsv2's loss includes the three balance
losses; transformers' is cross-entropy only (it has no device-level losses). MFU counts the
activated parameters (6 FLOPs per parameter per token) plus causal attention, over the GPU's
dense bf16 peak; the same table shows a large matmul measured in this run as the practical limit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv2.config import preset  # noqa: E402
from dsv2.info import count_params  # noqa: E402
from dsv2.model import Transformer  # noqa: E402
from dsv2.train.losses import BalanceConfig, training_loss  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM datasheet)


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x activated parameters (embedding lookup excluded) + attention
    score and value matmuls (2 x 2 x heads x (qk + v) / 2 per key, causal => seq/2 keys), x3 for
    forward + backward."""
    dense = 6 * count_params(config)["activated"]
    heads = config.num_attention_heads
    attn = 3 * 2 * heads * (config.qk_head_dim + config.v_head_dim) * (seq_len / 2) * config.num_hidden_layers
    return dense + attn


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t)


def time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def dsv2_step_fn(config, tokens, targets, compile_model: bool, accum: int = 1):
    model = Transformer(config).cuda()
    model.init_weights()
    model.train()
    fwd = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    balance = BalanceConfig(groups=config.n_group or 1, device_limit=config.topk_group or 1)

    def step():
        for _ in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fwd(tokens, return_router=True)
            loss, _ = training_loss(out.logits, targets, out.router, config.n_routed_experts,
                                    config.num_experts_per_tok, balance)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_step_fn(config, tokens, targets, accum: int = 1):
    import transformers

    hf_config = transformers.DeepseekV2Config(**{k: v for k, v in config.to_hf().items()
                                                 if k not in ("architectures", "model_type")})
    kwargs = {"attn_implementation": "sdpa"}
    try:
        model = transformers.DeepseekV2ForCausalLM._from_config(
            hf_config, experts_implementation="grouped_mm", **kwargs)
    except TypeError:
        model = transformers.DeepseekV2ForCausalLM._from_config(hf_config, **kwargs)
    model = model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step():
        for _ in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, getattr(model.config, "_experts_implementation", None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dsv2-1b-moe")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("train_bench.json"))
    args = ap.parse_args()

    config = preset(args.preset, torch_dtype="float32")
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g).cuda()
    tokens, targets = data[:, :-1], data[:, 1:]
    n_tokens = tokens.numel() * args.accum
    fpt = flops_per_token(config, args.seq_len)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
    measured_peak = matmul_peak()
    params = count_params(config)
    rows = {}

    sec = time_steps(dsv2_step_fn(config, tokens, targets, args.compile, args.accum), args.steps, args.warmup)
    rows["dsv2" + (" (compiled)" if args.compile else "")] = sec
    torch.cuda.empty_cache()
    hf_impl = None
    oom = []
    if not args.skip_hf:
        try:
            step, hf_impl = hf_step_fn(config, tokens, targets, args.accum)
            rows[f"transformers (experts={hf_impl}, sdpa)"] = time_steps(step, args.steps, args.warmup)
        except torch.OutOfMemoryError:
            oom.append("transformers")
        step = None
        torch.cuda.empty_cache()

    result = {
        "device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset, "params_total": params["total"], "params_activated": params["activated"],
        "micro_batch": args.micro_batch, "accum": args.accum, "seq_len": args.seq_len, "tokens_per_step": n_tokens,
        "flops_per_token": fpt, "peak_bf16_flops": peak, "measured_matmul_flops": measured_peak,
        "rows": {k: {"step_s": v, "tokens_per_s": n_tokens / v, "mfu": n_tokens * fpt / v / peak}
                 for k, v in rows.items()},
        "out_of_memory": oom,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{args.preset}: {params['total'] / 1e9:.2f}B total, {params['activated'] / 1e9:.3f}B activated; "
          f"{args.accum}x{args.micro_batch}x{args.seq_len} tokens/step; {fpt / 1e9:.2f} GFLOP/token; {name}")
    print(f"{'implementation':<42}{'step ms':>9}{'tokens/s':>11}{'MFU':>7}")
    for k, r in result["rows"].items():
        print(f"{k:<42}{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>11.0f}{r['mfu'] * 100:>6.1f}%")
    for k in oom:
        print(f"{k:<42}{'out of memory':>27}")
    print(f"{'limit: matmul measured in this run':<42}{'':>9}{measured_peak / fpt:>11.0f}"
          f"{measured_peak / peak * 100:>6.1f}%")
    base = [v for k, v in result["rows"].items() if k.startswith("transformers")]
    if base:
        ours = result["rows"][next(iter(rows))]["tokens_per_s"]
        print(f"dsv2 / transformers: {ours / base[0]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()

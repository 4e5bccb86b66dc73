"""Throughput of the multiple-choice scorer: questions per second, dsv2 against transformers.

A batch of MMLU-shaped questions (a context of --context tokens and --choices options of
--option tokens each, random token ids) scored as lm-evaluation-harness scores them: the summed
log-probability of each option after its context, and whether it is the greedy continuation.
Rows, same questions in the same run:
- dsv2 engine: EvalModel(backend="engine"), requests with prompt logprobs, continuous batching;
- dsv2 forward: EvalModel(backend="reference"), padded batches of --batch-size requests, logits
  only at the scored positions (what `dsv2 eval` uses for log-likelihoods on CUDA);
- transformers: DeepseekV2ForCausalLM (sdpa, grouped_mm experts) on the same padded batches, with
  the same log_softmax and gather;
- limit: the batch's FLOPs (2 x activated parameters per token + causal attention) at the
  datasheet's dense bf16 peak.

    PYTHONPATH=. python bench/eval_bench.py                 # V2-Lite shape, random bf16 weights
    PYTHONPATH=. python bench/eval_bench.py --quick --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine_bench import PEAK_BF16, build_hf, free_memory, guarded, log  # noqa: E402
from dsv2.checkpoint import random_model  # noqa: E402
from dsv2.config import preset  # noqa: E402
from dsv2.eval.lm import EvalModel  # noqa: E402
from dsv2.info import count_params  # noqa: E402


def questions(n: int, context: int, choices: int, option: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ctx = torch.randint(0, vocab, (context,), generator=g).tolist()
        out.append([(ctx, torch.randint(0, vocab, (option,), generator=g).tolist()) for _ in range(choices)])
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_dsv2(model, backend: str, qs, batch_size: int, reps: int) -> dict:
    lm = EvalModel(model, None, backend=backend, batch_size=batch_size)
    reqs = [r for q in qs for r in q]
    lm.loglikelihood(reqs[: 2 * batch_size])  # compile, capture, warm the allocator
    best, scores = float("inf"), None
    for _ in range(reps):
        sync(lm.device)
        t = time.perf_counter()
        scores = lm.loglikelihood(reqs)
        sync(lm.device)
        best = min(best, time.perf_counter() - t)
    return {"status": "ok", "seconds": best, "questions_s": len(qs) / best, "scores": [s for s, _ in scores]}


@torch.inference_mode()
def time_hf(hf, qs, batch_size: int, reps: int, device) -> dict:
    reqs = [r for q in qs for r in q]

    def score(batch):
        rows = [c + x for c, x in batch]
        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        logp = F.log_softmax(hf(tokens.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1)
        out = []
        for i, (c, x) in enumerate(batch):
            pos = torch.arange(len(c) - 1, len(c) + len(x) - 1, device=device)
            lp = logp[i, pos]
            target = torch.tensor(x, device=device)
            out.append((lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())))
        return out

    score(reqs[:batch_size])
    best, scores = float("inf"), None
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        scores = [s for i in range(0, len(reqs), batch_size) for s in score(reqs[i:i + batch_size])]
        sync(device)
        best = min(best, time.perf_counter() - t)
    return {"status": "ok", "seconds": best, "questions_s": len(qs) / best, "scores": [s for s, _ in scores]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="default deepseek-v2-lite (dsv2-tiny with --quick)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--questions", type=int, default=None)
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--option", type=int, default=4, help="tokens per option")
    ap.add_argument("--batch-size", type=int, default=16, help="requests per padded forward (forward rows)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/eval_bench_h100.json")
    args = ap.parse_args(argv)
    args.preset = args.preset or ("dsv2-tiny" if args.quick else "deepseek-v2-lite")
    args.questions = args.questions or (8 if args.quick else 256)
    args.context = args.context or (48 if args.quick else 512)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = preset(args.preset)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    qs = questions(args.questions, args.context, args.choices, args.option, config.vocab_size)
    tokens = args.questions * args.choices * (args.context + args.option)
    flops = 2 * count_params(config)["activated"] * tokens + 2 * 2 * config.num_attention_heads * (
        config.qk_head_dim + config.v_head_dim) / 2 * (args.context + args.option) ** 2 * args.questions * args.choices
    res = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "preset": args.preset,
           "args": {k: str(v) for k, v in vars(args).items()}, "tokens": tokens, "flops": flops,
           "limit_questions_s": args.questions / (flops / peak) if peak else None, "rows": {}}
    log(f"building {args.preset} ({dtype}) on {device}")
    model = random_model(config, device, dtype)
    for backend, row in (("engine", "dsv2 engine"), ("reference", "dsv2 forward")):
        log(row)
        res["rows"][row] = guarded(backend, lambda b=backend: time_dsv2(model, b, qs, args.batch_size, args.reps))
    del model
    free_memory()
    if not args.skip_hf:
        built = guarded("transformers build", lambda: {"status": "ok", "pair": build_hf(config, device, dtype)})
        if built.get("status") == "ok":
            hf, res["transformers_impl"] = built.pop("pair")
            log("transformers")
            res["rows"]["transformers"] = guarded("transformers", lambda: time_hf(hf, qs, args.batch_size, args.reps, device))
    ref = res["rows"].get("dsv2 forward", {}).get("scores")
    print(f"\nmultiple-choice scoring, {args.questions} questions x {args.choices} options, context {args.context}, "
          f"{args.preset} on {name}")
    print(f"{'row':<18}{'questions/s':>13}{'seconds':>10}{'% of limit':>12}{'max |score - dsv2 forward|':>28}")
    for row, r in res["rows"].items():
        if r.get("status") != "ok":
            print(f"{row:<18}{r.get('status')}: {r.get('error', '')}")
            continue
        # transformers builds its own random weights: its scores are not comparable
        diff = max(abs(a - b) for a, b in zip(r["scores"], ref)) if ref and row.startswith("dsv2") else float("nan")
        r["max_abs_diff_vs_forward"] = diff
        pct = 100 * r["questions_s"] / res["limit_questions_s"] if res["limit_questions_s"] else float("nan")
        print(f"{row:<18}{r['questions_s']:>13,.1f}{r['seconds']:>10.2f}{pct:>11.1f}%{diff:>28.3g}")
    if res["limit_questions_s"]:
        print(f"{'limit (FLOPs)':<18}{res['limit_questions_s']:>13,.1f}")
    for r in res["rows"].values():
        r.pop("scores", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"JSON: {args.out}")
    return res


if __name__ == "__main__":
    main()

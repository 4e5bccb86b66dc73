"""`dsv2 eval --model DIR --task NAME [--data FILE] [--limit N]`: one task, results as JSON and a
markdown table (printed, and written beside the JSON)."""

from __future__ import annotations

import json
import time
from pathlib import Path

TASKS = ("mc", "gsm8k", "humaneval", "niah", "perplexity")
NEEDS_DATA = ("mc", "gsm8k", "perplexity")


def run_task(model, task: str, data: str | None, limit: int | None, num_fewshot: int | None, args) -> dict:
    if task in NEEDS_DATA and not data:
        raise ValueError(f"task {task!r} needs --data FILE")
    if task == "mc":
        from .multiple_choice import run_multiple_choice

        return run_multiple_choice(model, data, limit, num_fewshot or 0, args.seed)
    if task == "gsm8k":
        from .exact_match import run_exact_match

        return run_exact_match(model, data, limit, 4 if num_fewshot is None else num_fewshot, args.seed,
                               args.max_new_tokens or 256)
    if task == "humaneval":
        from .humaneval import load_problems, run_humaneval

        k = [int(x) for x in args.k.split(",")] if args.k else None
        return run_humaneval(model, load_problems(data), n=args.samples, k=k, limit=limit,
                             max_new_tokens=args.max_new_tokens or 384, seed=args.seed)
    if task == "niah":
        from .niah import run_niah

        heatmap = Path(args.out) / "niah.png" if args.out else None
        return run_niah(model, trials=args.trials, seed=args.seed, heatmap=heatmap)
    if task == "perplexity":
        from .perplexity import run_perplexity

        return run_perplexity(model, data, window=args.window, stride=args.stride, limit=limit)
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def markdown(result: dict, model: str) -> str:
    rows = "\n".join(f"| {model} | {result['task']} | {k} | {_fmt(v)} |" for k, v in result["metrics"].items())
    return "| model | task | metric | value |\n|---|---|---|---:|\n" + rows + "\n"


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _eval(args) -> int:
    from ..resources import bundled_model_dir
    from .lm import EvalModel

    model_dir = args.model or str(bundled_model_dir())
    model = EvalModel(model_dir, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                      backend=args.backend, batch_size=args.batch_size)
    t = time.perf_counter()
    result = run_task(model, args.task, args.data, args.limit, args.num_fewshot, args)
    result["seconds"] = time.perf_counter() - t
    result["model"] = model_dir
    result["backend"] = model.backend
    table = markdown(result, Path(model_dir).name)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.task}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"{args.task}.md").write_text(table)
        print(f"results: {out / (args.task + '.json')}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: multiple choice, GSM8K, HumanEval, needle in a haystack, "
                                    "perplexity")
    p.add_argument("--model", default=None, help="HF-format model directory (default: the bundled model)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", default=None, help="JSONL (mc, gsm8k, humaneval) or text file (perplexity)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (or tokens, perplexity)")
    p.add_argument("--num-fewshot", type=int, default=None, help="solved examples in each prompt (mc 0, gsm8k 4)")
    p.add_argument("--out", default=None, help="directory for TASK.json and TASK.md")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backend", default="auto", choices=("auto", "engine", "reference"),
                   help="auto: the engine on CUDA, plain forward passes on CPU")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--samples", type=int, default=1, help="humaneval: completions per problem (n)")
    p.add_argument("--k", default=None, help="humaneval: pass@k values, comma separated (default 1, and n)")
    p.add_argument("--trials", type=int, default=1, help="niah: needles per length and depth")
    p.add_argument("--window", type=int, default=None, help="perplexity: tokens per window (default: the context)")
    p.add_argument("--stride", type=int, default=None, help="perplexity: tokens between windows (default window/2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_eval)

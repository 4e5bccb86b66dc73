"""Structured outputs' cost on the engine: decode throughput of a batch of free requests against
the same batch with every row (or half the rows) held to a JSON schema or a regex by its grammar.

    python bench/structured_bench.py --preset deepseek-v2-lite      # GPU: V2-Lite shape, random bf16 weights
    python bench/structured_bench.py --smoke                        # CPU smoke run: the bundled model, seconds

Each row: B requests of a random `--prompt`-token prompt, greedy; the engine steps until every
request has its first token, then `--warmup-steps` steps (graph capture, grammar warm-up), then
`--steps` timed steps. Tokens are counted from the sequences (those still in flight included), so
async steps (free batches) and synchronous ones (batches with a constrained row) count alike. The
grammars cannot complete within the run (an array of at least 4,096 records; a regex of at least
4,096 characters), so every row decodes throughout: a completed grammar would leave its row early.

Modes: free (the reference: its greedy rows take the fused greedy kernel on CUDA), json (every row
constrained by the schema), mixed (every other row), regex (every row). Beside each figure: the
host's time filling the masks per step (llguidance, in its thread pool, overlapping the model's
forward on the device) and the ratio to free. The masks' cost grows with the tokenizer's
vocabulary: the default is the bundled 8,192-token one (`--tokenizer DIR` for another
tokenizer.json, e.g. DeepSeek-V2's 100K; the model's vocabulary must hold it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._log import stamped, sync  # noqa: E402
from dsv2.checkpoint import load_model, random_model  # noqa: E402
from dsv2.config import preset  # noqa: E402
from dsv2.engine import EngineConfig, LLMEngine, SamplingParams, StructuredOutputsParams  # noqa: E402
from dsv2.resources import bundled_model_dir  # noqa: E402
from dsv2.tokenizer import Tokenizer  # noqa: E402

RECORD = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}}}}
SPECS = {"json": StructuredOutputsParams(json={"type": "array", "items": RECORD, "minItems": 4096}),
         "regex": StructuredOutputsParams(regex=r"[a-z][a-z0-9 ,.]{4096,}")}
MODES = ("free", "json", "mixed", "regex")
log = stamped("structured_bench")



class MaskTimer:
    """Wall time of the engine's mask fills (the host's part of a constrained step)."""

    def __init__(self, grammars):
        self.seconds, self.calls, fill = 0.0, 0, grammars.fill_bitmask

        def timed(batch):
            t = time.perf_counter()
            try:
                return fill(batch)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1

        grammars.fill_bitmask = timed


def generated(engine: LLMEngine) -> int:
    """Tokens the running requests have sampled, those still in flight included."""
    return sum(len(s.output_token_ids) for seqs in engine.requests.values() for s in seqs)


def decode_row(engine: LLMEngine, timer: MaskTimer, mode: str, batch: int, prompt: int, warmup: int,
               steps: int, vocab: int, max_tokens: int) -> dict:
    device = engine.runner.device
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(2, vocab, (batch, prompt), generator=g).tolist()
    ids = [f"{mode}-{batch}-{i}" for i in range(batch)]
    for i, (rid, p) in enumerate(zip(ids, prompts)):
        constrained = mode in ("json", "regex") or (mode == "mixed" and i % 2 == 0)
        spec = SPECS["regex" if mode == "regex" else "json"] if constrained else None
        engine.add_request(rid, p, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                                  structured_outputs=spec))
    while any(not s.output_token_ids for seqs in engine.requests.values() for s in seqs):
        engine.step()
    for _ in range(warmup):
        engine.step()
    sync(device)
    before, mask_s, mask_calls = generated(engine), timer.seconds, timer.calls
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    seconds = time.perf_counter() - t
    tokens = generated(engine) - before
    running = len(engine.requests)
    for rid in ids:
        engine.abort_request(rid)
    engine.step()  # the last step in flight, if any, read back and dropped
    return {"status": "ok", "mode": mode, "batch": batch, "steps": steps, "seconds": seconds, "tokens": tokens,
            "tok_s": tokens / seconds, "ms_per_step": seconds / steps * 1e3,
            "mask_ms_per_step": (timer.seconds - mask_s) / steps * 1e3, "mask_calls": timer.calls - mask_calls,
            "every_row_decoded": tokens == batch * steps and running == batch}


def compile_times(engine: LLMEngine) -> dict:
    """A schema's first compile (cold) and a cache hit, in ms."""
    spec = StructuredOutputsParams(json={"type": "array", "items": RECORD, "minItems": 17})
    out = {}
    for name in ("cold_ms", "cached_ms"):
        t = time.perf_counter()
        engine.grammars.compile(spec)
        out[name] = (time.perf_counter() - t) * 1e3
    return out


def print_table(res: dict) -> None:
    print(f"\nStructured outputs on {res['device']} ({res['model']}, tokenizer vocabulary {res['tokenizer_vocab']:,}); "
          f"schema compile {res['compile']['cold_ms']:.1f} ms cold, {res['compile']['cached_ms']:.3f} ms cached")
    print(f"{'batch':>5} {'mode':<6} {'tok/s':>10} {'ms/step':>9} {'mask ms/step':>13} {'vs free':>8}")
    free = {r["batch"]: r["tok_s"] for r in res["rows"] if r["mode"] == "free" and r["status"] == "ok"}
    for r in res["rows"]:
        if r["status"] != "ok":
            print(f"{r['batch']:>5} {r['mode']:<6} {r['status']}: {r.get('error', '')[:80]}")
            continue
        ratio = r["tok_s"] / free[r["batch"]] if r["batch"] in free else math.nan
        flag = "" if r["every_row_decoded"] else "  (not every row decoded every step)"
        print(f"{r['batch']:>5} {r['mode']:<6} {r['tok_s']:>10,.0f} {r['ms_per_step']:>9.2f} "
              f"{r['mask_ms_per_step']:>13.3f} {ratio:>7.2f}x{flag}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="HF-format model directory (default: the bundled one)")
    ap.add_argument("--preset", default=None, help="random weights of a preset's shape instead, e.g. deepseek-v2-lite")
    ap.add_argument("--tokenizer", type=Path, default=None, help="directory of tokenizer.json (default: the "
                                                                 "model's; the bundled one with --preset)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--batches", default=None, help="comma separated (default 1,16,64,256; 1,4 with --smoke)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens per request (default 128)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="default 8")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 64)")
    ap.add_argument("--batched-tokens", type=int, default=2048, help="engine max_num_batched_tokens")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (enforce_eager)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, seconds")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results (default bench/results/structured_bench_<device>.json)")
    args = ap.parse_args(argv)
    sizes = {"batches": "1,4", "prompt": 16, "warmup_steps": 2, "steps": 6} if args.smoke else {
        "batches": "1,16,64,256", "prompt": 128, "warmup_steps": 8, "steps": 64}
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke:
        args.device = "cpu"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batches = [int(b) for b in args.batches.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    if args.preset:
        log(f"building {args.preset} with random weights on {device} ({dtype})")
        model = random_model(preset(args.preset), device, dtype)
        tokenizer = Tokenizer.from_dir(args.tokenizer or bundled_model_dir())
        model_name = f"{args.preset} (random weights)"
    else:
        path = args.model or bundled_model_dir()
        model = load_model(path, device=device, dtype=dtype)
        tokenizer = Tokenizer.from_dir(args.tokenizer or path)
        model_name = "bundled" if args.model is None else str(path)
    vocab = tokenizer.vocab_size
    if vocab > model.config.vocab_size:
        raise SystemExit(f"the tokenizer's {vocab:,} tokens do not fit the model's vocabulary "
                         f"({model.config.vocab_size:,})")
    max_batch = max(batches)
    max_tokens = 2 + args.warmup_steps + args.steps + math.ceil(max_batch * args.prompt / args.batched_tokens)
    engine = LLMEngine(model, tokenizer, EngineConfig(
        max_num_seqs=max_batch, max_num_batched_tokens=max(args.batched_tokens, max_batch),
        max_model_len=args.prompt + max_tokens, enable_prefix_caching=False, enforce_eager=args.eager,
        block_size=64, num_blocks=None if device.type == "cuda" else max_batch * math.ceil(
            (args.prompt + max_tokens) / 64)))
    timer = MaskTimer(engine.grammars)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "model": model_name,
           "dtype": str(dtype).removeprefix("torch."), "tokenizer_vocab": vocab, "cuda_graphs": engine.runner.use_graphs,
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "compile": compile_times(engine), "rows": []}
    out = args.out or ROOT / "bench" / "results" / f"structured_bench_{'cpu' if device.type == 'cpu' else 'gpu'}.json"
    for b in batches:
        for mode in modes:
            log(f"batch {b}, {mode}")
            try:
                row = decode_row(engine, timer, mode, b, args.prompt, args.warmup_steps, args.steps, vocab, max_tokens)
            except Exception as e:  # noqa: BLE001 - a long GPU run keeps its other rows
                for rid in list(engine.requests):
                    engine.abort_request(rid)
                row = {"status": "error", "mode": mode, "batch": b, "error": f"{type(e).__name__}: {e}"[:800]}
            res["rows"].append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1) + "\n")
    print_table(res)
    log(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()

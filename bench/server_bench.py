"""Online serving benchmark and load test of `dsv2 serve`: many concurrent streaming requests
through the OpenAI API from one asyncio client, with every stream's tokens accounted for and the
server's state checked afterwards.

    python bench/server_bench.py --serve-args "--device cpu" --requests 200 --prompt-len 32 --max-tokens 16
    python bench/server_bench.py --model-shape deepseek-v2-lite --serve-args "--max-model-len 4096" \\
        --requests 256 --prompt-len 512 --max-tokens 256 --out bench/results/server_bench_h100.json
    python bench/server_bench.py --url http://127.0.0.1:8000 --vocab-size 102400 --requests 64

The server is either started here (`python -m dsv2 serve --serve-args ...`, the bundled model
unless they name --model; stopped at the end) or an idle one at --url. --model-shape PRESET serves
a temporary model directory holding that preset's config.json and the bundled tokenizer with
--load-format dummy: random bf16 weights of a released shape (deepseek-v2-lite) without its
checkpoint. Generated ids past the bundled tokenizer's 8192 decode to no text; every token still
travels as its own chunk, so the accounting below is unaffected.

Each request is a streaming completion of a random `--prompt-len`-token prompt (token ids, so the
length is exact; --endpoint chat sends that many random words instead) with ignore_eos and
`--max-tokens`, so every stream that runs to its end has exactly that many tokens. A
`--disconnect-frac` of the clients closes its connection after 0 to max_tokens/2 token chunks:
early enough that the server cannot have finished the request, so each of them must count as one
abort.

Checks (exit status 1 if any fails): no HTTP or in-stream errors; every complete stream has
max_tokens token chunks, usage.completion_tokens == max_tokens (and prompt_tokens == prompt-len for
token-id prompts), finish_reason "length" and `data: [DONE]`; then, polling /metrics for up to
--settle seconds: nothing in flight, running or waiting, every KV-cache block free, the aborted
counter up by the number of disconnects and the generation-token counter up by complete streams x
max_tokens (the counters are compared before and after, so the server must be otherwise idle).

Figures, from the run after --warmup-runs untimed runs of the same load with other prompts (so
that compilation and CUDA-graph capture at each new batch shape fall outside it): time to first
token (from sending the request, so it includes queueing) and inter-token latency percentiles over
all tokens of all streams, per-request decode tok/s (tokens after the first over the time after
the first), and over the whole run (first request sent to last stream ended) output tok/s and
completed requests/s. The client's own CPU use is reported beside them:
near 100% of one core, the figures measure the client, not the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._log import stamped  # noqa: E402

# start_server and stop_server are imported from here by bench/hostile_bench.py and tests/server_util.py
from bench._serve import (  # noqa: E402, F401
    is_token_chunk, local_device, local_vocab, serving, shape_serve_args, start_server, stop_server,
)

# the words of --endpoint chat prompts: common ones, so most are one token in any English BPE
WORDS = ("the of and to in is that it was for on are as with his they at be this from have or by one "
         "had not but what all were when we there can an your which their said if do will each about how "
         "up out them then she many some so these would other into has more her two like him see time "
         "could no make than first been its who now people my made over did down only way find use may "
         "water long little very").split()
log = stamped("server_bench")


# --- the load ------------------------------------------------------------------------------------
@dataclass
class Load:
    requests: int = 100
    concurrency: int | None = None  # None: all at once
    prompt_len: int = 32
    max_tokens: int = 16
    disconnect_frac: float = 0.0
    endpoint: str = "completions"  # or "chat"
    vocab_size: int = 8192  # token-id prompts are drawn from [0, vocab_size)
    temperature: float = 0.0
    seed: int = 0
    timeout_s: float = 600.0  # per request


@dataclass
class Stream:
    """What one client saw. `times` holds the arrival of each token chunk (perf_counter)."""

    disconnect_after: int | None  # token chunks after which this client leaves; None: reads to the end
    start: float = 0.0
    end: float = 0.0
    times: list[float] = field(default_factory=list)
    status: int | None = None
    error: str | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    done: bool = False  # saw `data: [DONE]`
    disconnected: bool = False


def request_bodies(load: Load, model: str) -> list[dict]:
    rng = random.Random(load.seed)
    bodies = []
    for _ in range(load.requests):
        body = {"model": model, "max_tokens": load.max_tokens, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}, "temperature": load.temperature}
        if load.endpoint == "chat":
            text = " ".join(rng.choice(WORDS) for _ in range(load.prompt_len))
            body["messages"] = [{"role": "user", "content": text}]
        else:  # distinct random prompts: no request is served from another's prefix cache
            body["prompt"] = [rng.randrange(load.vocab_size) for _ in range(load.prompt_len)]
        bodies.append(body)
    return bodies


def disconnect_points(load: Load) -> list[int | None]:
    """Per request, the token chunks after which it disconnects (None: never). At most half of
    max_tokens, so the server still has steps to run when the client leaves and each one is an
    abort rather than a race with the request's end."""
    rng = random.Random(load.seed + 1)
    leaving = set(rng.sample(range(load.requests), round(load.disconnect_frac * load.requests)))
    return [rng.randint(0, load.max_tokens // 2) if i in leaving else None for i in range(load.requests)]


async def stream_one(client: httpx.AsyncClient, path: str, body: dict, s: Stream) -> None:
    chat = path.endswith("chat/completions")
    s.start = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as resp:
            s.status = resp.status_code
            if resp.status_code != 200:
                s.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return
            if s.disconnect_after == 0:
                s.disconnected = True
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    s.done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    s.error = f"in stream: {chunk['error'].get('message')}"
                    break
                if chunk.get("usage"):
                    s.usage = chunk["usage"]
                for choice in chunk["choices"]:
                    if is_token_chunk(choice, chat):
                        s.times.append(time.perf_counter())
                    s.finish_reason = choice.get("finish_reason") or s.finish_reason
                if s.disconnect_after is not None and len(s.times) >= s.disconnect_after:
                    # leaving the block closes the response; unread, its connection is closed, not pooled
                    s.disconnected = True
                    break
    except (httpx.HTTPError, ValueError) as e:  # ValueError: a chunk that is not JSON
        s.error = f"{type(e).__name__}: {e}"
    finally:
        s.end = time.perf_counter()


async def run_load(client: httpx.AsyncClient, model: str, load: Load) -> tuple[list[Stream], float, float]:
    """Every request of the load, at most `concurrency` at a time: (streams, run start, run end)."""
    path = "/v1/chat/completions" if load.endpoint == "chat" else "/v1/completions"
    streams = [Stream(d) for d in disconnect_points(load)]
    gate = asyncio.Semaphore(load.concurrency or load.requests)

    async def one(body: dict, s: Stream) -> None:
        async with gate:
            await stream_one(client, path, body, s)

    t0 = time.perf_counter()
    progress = asyncio.create_task(_report_progress(streams, t0))
    try:
        await asyncio.gather(*(one(b, s) for b, s in zip(request_bodies(load, model), streams, strict=True)))
    finally:
        progress.cancel()
    return streams, t0, time.perf_counter()


async def _report_progress(streams: list[Stream], t0: float, every_s: float = 15.0) -> None:
    """A line every `every_s` seconds, so that a slow run is told from a stuck one."""
    while True:
        await asyncio.sleep(every_s)
        ended = sum(s.end > 0 for s in streams)
        log(f"  {time.perf_counter() - t0:.0f} s: {ended} of {len(streams)} streams ended, "
            f"{sum(len(s.times) for s in streams):,} tokens received")


# --- the server's side ----------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text page, by name."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    resp = await client.get("/metrics")
    resp.raise_for_status()
    return parse_metrics(resp.text)


def _busy(m: dict[str, float]) -> tuple[float, float, float]:
    return m["dsv2_requests_in_flight"], m["dsv2_num_requests_running"], m["dsv2_num_requests_waiting"]


def _settled(m: dict[str, float], before: dict[str, float], aborts: int, tokens: int) -> bool:
    return (_busy(m) == (0, 0, 0) and m["dsv2_kv_cache_free_blocks"] == m["dsv2_kv_cache_blocks"]
            and m["dsv2_requests_aborted_total"] - before["dsv2_requests_aborted_total"] == aborts
            and m["dsv2_generation_tokens_total"] - before["dsv2_generation_tokens_total"] == tokens)


async def settle(client: httpx.AsyncClient, before: dict[str, float], aborts: int, tokens: int,
                 timeout_s: float) -> dict[str, float]:
    """/metrics once the server reads as idle with the expected counters, or at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = await scrape(client)
        if _settled(m, before, aborts, tokens) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.25)


# --- checks and figures ----------------------------------------------------------------------------
def check_streams(streams: list[Stream], load: Load) -> list[dict]:
    errors = [s for s in streams if s.error]
    complete = [s for s in streams if not s.disconnected and not s.error]
    want_prompt = load.prompt_len if load.endpoint == "completions" else None

    def exact(s: Stream) -> bool:
        u = s.usage or {}
        return (s.done and s.finish_reason == "length"
                and len(s.times) == u.get("completion_tokens") == load.max_tokens
                and want_prompt in (None, u.get("prompt_tokens")))

    wrong = [s for s in complete if not exact(s)]
    planned = sum(s.disconnect_after is not None for s in streams)
    left = sum(s.disconnected for s in streams)
    return [
        _check("no errors", not errors, f"{len(errors)} of {len(streams)} failed"
               + (f"; first: {errors[0].error}" if errors else "")),
        _check("exact streams", not wrong and len(complete) == len(streams) - planned,
               f"{len(complete) - len(wrong)} of {len(complete)} complete streams have "
               f"{load.max_tokens} token chunks = usage.completion_tokens, finish 'length' and [DONE]" + (
                   f"; first bad: chunks {len(wrong[0].times)}, usage {wrong[0].usage}, finish "
                   f"{wrong[0].finish_reason}, done {wrong[0].done}" if wrong else "")),
        _check("disconnects", left == planned, f"{left} clients left early of {planned} planned"),
    ]


def check_server(m: dict[str, float], before: dict[str, float], aborts: int, tokens: int) -> list[dict]:
    aborted = m["dsv2_requests_aborted_total"] - before["dsv2_requests_aborted_total"]
    generated = m["dsv2_generation_tokens_total"] - before["dsv2_generation_tokens_total"]
    idle = _busy(m)
    return [
        _check("drained", idle == (0, 0, 0),
               "in flight / running / waiting = {:.0f} / {:.0f} / {:.0f}".format(*idle)),
        _check("cache all free", m["dsv2_kv_cache_free_blocks"] == m["dsv2_kv_cache_blocks"],
               f"{m['dsv2_kv_cache_free_blocks']:.0f} of {m['dsv2_kv_cache_blocks']:.0f} blocks free"),
        _check("aborts counted", aborted == aborts,
               f"dsv2_requests_aborted_total +{aborted:.0f}, {aborts} disconnects"),
        _check("tokens counted", generated == tokens,
               f"dsv2_generation_tokens_total +{generated:.0f}, complete streams carried {tokens}"),
    ]


def _check(name: str, ok: bool, detail: str) -> dict:
    return {"name": name, "ok": bool(ok), "detail": detail}


def percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _dist(xs: list[float], scale: float = 1.0) -> dict:
    d = {f"p{q}": percentile(xs, q) for q in (50, 90, 99)}
    d["mean"] = sum(xs) / len(xs) if xs else None
    return {k: (v * scale if v is not None else None) for k, v in d.items()} | {"n": len(xs)}


def summarize(streams: list[Stream], t0: float, t1: float, client_cpu_s: float) -> dict:
    ok = [s for s in streams if not s.error]
    complete = [s for s in ok if not s.disconnected]
    ttft = [s.times[0] - s.start for s in ok if s.times]
    itl = [b - a for s in ok for a, b in zip(s.times, s.times[1:])]
    decode = [(len(s.times) - 1) / (s.times[-1] - s.times[0]) for s in complete
              if len(s.times) > 1 and s.times[-1] > s.times[0]]
    duration = t1 - t0
    tokens = sum(len(s.times) for s in ok)
    return {"duration_s": duration, "completed": len(complete),
            "disconnected": sum(s.disconnected for s in ok),
            "errors": len(streams) - len(ok), "output_tokens": tokens, "output_tok_s": tokens / duration,
            "requests_s": len(complete) / duration, "client_cpu_s": client_cpu_s,
            "client_cpu_util": client_cpu_s / duration,
            "ttft_ms": _dist(ttft, 1e3), "itl_ms": _dist(itl, 1e3), "decode_tok_s_per_request": _dist(decode)}


async def _measure(url: str, model: str | None, load: Load, api_key: str | None, settle_s: float) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    n = load.concurrency or load.requests
    limits = httpx.Limits(max_connections=n + 1, max_keepalive_connections=n + 1)  # +1: /metrics
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(load.timeout_s, connect=60.0)) as client:
        if model is None:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
        before = await scrape(client)
        cpu0 = time.process_time()
        streams, t0, t1 = await run_load(client, model, load)
        cpu = time.process_time() - cpu0
        aborts = sum(s.disconnected for s in streams)
        tokens = sum(len(s.times) for s in streams if not s.disconnected and not s.error)
        after = await settle(client, before, aborts, tokens, settle_s)
    return {"model": model, "load": asdict(load), "summary": summarize(streams, t0, t1, cpu),
            "checks": check_streams(streams, load) + check_server(after, before, aborts, tokens),
            "metrics_before": before, "metrics_after": after}


def measure(url: str, load: Load, model: str | None = None, api_key: str | None = None,
            settle_s: float = 30.0) -> dict:
    """Run `load` against the server at `url` (model: its first /v1/models entry unless given) and
    check it: {"model", "load", "summary", "checks", "ok", "metrics_before", "metrics_after"}."""
    res = asyncio.run(_measure(url, model, load, api_key, settle_s))
    res["ok"] = all(c["ok"] for c in res["checks"])
    return res


# --- the report -------------------------------------------------------------------------------------
def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def print_report(res: dict) -> None:
    load, s = res["load"], res["summary"]
    print(f"\n{res['model']} on {res.get('device', '?')}: {load['requests']} {load['endpoint']} requests, "
          f"concurrency {load['concurrency'] or load['requests']}, prompt {load['prompt_len']} "
          f"{'tokens' if load['endpoint'] == 'completions' else 'words'}, max_tokens {load['max_tokens']}, "
          f"disconnect fraction {load['disconnect_frac']:g}")
    print(f"{'':<26}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}")
    for label, key, spec in (("TTFT ms", "ttft_ms", ",.1f"), ("inter-token latency ms", "itl_ms", ",.2f"),
                             ("decode tok/s per request", "decode_tok_s_per_request", ",.1f")):
        d = s[key]
        print(f"{label:<26}" + "".join(f"{_fmt(d[k], spec):>10}" for k in ("p50", "p90", "p99", "mean")))
    print(f"run: {s['duration_s']:.2f} s, {s['output_tok_s']:,.1f} output tok/s, "
          f"{s['requests_s']:,.2f} requests/s; {s['completed']} complete, {s['disconnected']} disconnected, "
          f"{s['errors']} errors; client CPU {s['client_cpu_util']:.0%} of one core")
    print("checks:")
    for c in res["checks"]:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="an idle running server (default: start one here)")
    where.add_argument("--serve-args", default="", help="arguments for `python -m dsv2 serve` (one string)")
    ap.add_argument("--model-shape", default=None, metavar="PRESET",
                    help="serve random bf16 weights of a preset's shape, e.g. deepseek-v2-lite (or v2-lite)")
    ap.add_argument("--model", default=None, help="the model id to request (default: the server's first)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=None, help="requests open at once (default: all)")
    ap.add_argument("--prompt-len", type=int, default=32, help="tokens (chat: words)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--disconnect-frac", type=float, default=0.0)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="prompt token ids are below it (default: the model's, read when started here)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-runs", type=int, default=1,
                    help="untimed runs of the same load (other prompts) before the measured one")
    ap.add_argument("--settle", type=float, default=30.0, help="seconds to wait for the server to drain")
    ap.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for the server to come up")
    ap.add_argument("--serve-log", type=Path, default=None, help="keep the started server's output here")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/server_bench.json")
    args = ap.parse_args(argv)
    if args.url and args.model_shape:
        ap.error("--model-shape starts its own server: not with --url")
    if args.url and args.vocab_size is None and args.endpoint == "completions":
        ap.error("--url needs --vocab-size for token-id prompts (or --endpoint chat)")
    if not 0 <= args.disconnect_frac <= 1:
        ap.error("--disconnect-frac must be in [0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    serve_args = shlex.split(args.serve_args)
    with tempfile.TemporaryDirectory(prefix="server_bench-") as tmp, contextlib.ExitStack() as stack:
        if args.model_shape:
            serve_args = shape_serve_args(args.model_shape, serve_args, Path(tmp))
        serve_log = args.serve_log or Path(tmp) / "serve.log"
        url = args.url or stack.enter_context(serving(serve_args, serve_log, args.startup_timeout))
        load = Load(requests=args.requests, concurrency=args.concurrency, prompt_len=args.prompt_len,
                    max_tokens=args.max_tokens, disconnect_frac=args.disconnect_frac, endpoint=args.endpoint,
                    vocab_size=args.vocab_size or local_vocab(serve_args), temperature=args.temperature,
                    seed=args.seed)
        for i in range(args.warmup_runs):
            # lazy compilation, CUDA-graph capture and kernel autotuning happen at each new batch shape
            warm = measure(url, replace(load, seed=load.seed + 1000 + i, disconnect_frac=0.0),
                           args.model, args.api_key, args.settle)
            log(f"warm-up run {i + 1}: {warm['summary']['duration_s']:.1f} s, "
                f"{'ok' if warm['ok'] else 'FAILED'}")
        log(f"{load.requests} requests against {url}")
        res = measure(url, load, args.model, args.api_key, args.settle)
    res |= {"date": time.strftime("%Y-%m-%d"), "url": args.url,
            "device": "remote (--url)" if args.url else local_device(serve_args),
            "serve_args": None if args.url else serve_args, "model_shape": args.model_shape}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print_report(res)
    print(f"\nJSON: {args.out}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

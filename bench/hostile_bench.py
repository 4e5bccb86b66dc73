"""Hostile clients against `dsv2 serve`: each attack runs while another thread probes /health every
50 ms; the table gives what the attack got, how long it took to be answered or shut out, the worst
/health latency meanwhile, the server's RSS before and after, and whether a normal request works
afterwards. tests/test_server_hostile.py runs the same attacks and asserts on them.

    python bench/hostile_bench.py                        # a CPU server of the bundled model, started here
    python bench/hostile_bench.py --serve-args "--header-timeout 2 --body-timeout 2" --out bench/results/hostile.json
    python bench/hostile_bench.py --url http://127.0.0.1:8000 --pid 1234   # a running server (no SIGTERM, no faults)

Attacks, in order: 10 MB and 60 MB bodies; JSON nested 100,000 deep; invalid UTF-8; 200 connections
that send their headers and 1 byte of a 100 KB body, then stall; 1,000 connections that send
nothing; a client that reads a 400-token stream slowly. With a server started here it then
starts one more, through FAULTS (a prelude that injects failures into the engine), for an engine
step that fails (out of memory) and an engine that breaks (a dead engine), and one more for
SIGTERM in the middle of a stream. An attack that gets no answer within --attack-timeout is reported as
such; a server without the limits (an older dsv2) is measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.server_bench import start_server, stop_server  # noqa: E402

MODEL = "dsv2-bundled"
STEP_FAULT, DEAD_FAULT = 8191, 8190  # prompt token ids that trigger the injected failures

# Run as `python -c FAULTS serve ...`: the real server, with a model step that raises out of
# memory when a prompt holds STEP_FAULT, and an engine whose add_request breaks (not a refusal:
# an unexpected exception, as a bug would raise) when one holds DEAD_FAULT.
FAULTS = f"""
import sys, torch
from dsv2.engine import engine, runner
run, add = runner.ModelRunner.run, engine.LLMEngine.add_request
def faulty_run(self, items, *args, **kw):
    if any({STEP_FAULT} in seq.prompt_token_ids for seq, _ in items):
        raise torch.OutOfMemoryError("injected: out of memory in a step")
    return run(self, items, *args, **kw)
def faulty_add(self, request_id, prompt_token_ids, *args, **kw):
    if {DEAD_FAULT} in prompt_token_ids:
        raise RuntimeError("injected: the engine's state is broken")
    return add(self, request_id, prompt_token_ids, *args, **kw)
runner.ModelRunner.run, engine.LLMEngine.add_request = faulty_run, faulty_add
from dsv2.cli import main
sys.exit(main(sys.argv[1:]))
"""


def log(msg: str) -> None:
    print(f"[hostile_bench] {msg}", file=sys.stderr, flush=True)


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# The probe runs in a process of its own: in a thread of this one it would wait on the attacks'
# event loop for the GIL and measure the client, not the server.
_PROBE = """
import sys, time, httpx
url, every, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
with httpx.Client(timeout=timeout) as client:
    while sys.stdin.readline():  # one probe a line; EOF ends it
        begin = time.perf_counter()
        try:
            ok = client.get(url + "/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        print(time.perf_counter() - begin, int(ok), flush=True)
"""


class HealthProbe:
    """GET /health every `every` s from another process; the worst latency seen, and the probes
    that failed (no answer within `timeout`, or not 2xx)."""

    def __init__(self, url: str, every: float = 0.05, timeout: float = 5.0):
        self.url, self.every, self.timeout = url, every, timeout
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        proc = subprocess.Popen([sys.executable, "-c", _PROBE, self.url, str(self.every), str(self.timeout)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        with proc:
            while not self._stop.is_set():
                proc.stdin.write("\n")
                proc.stdin.flush()
                seconds, ok = proc.stdout.readline().split()
                self.latencies.append(float(seconds))
                self.failures += ok != "1"
                self._stop.wait(self.every)
            proc.stdin.close()

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        while not self.latencies and self._thread.is_alive():  # the first answer: the probe is up
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def worst_ms(self) -> float | None:
        return max(self.latencies) * 1e3 if self.latencies else None


# --- raw HTTP: the attacks need bytes that no polite client sends ---------------------------------
def _head(path: str, length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            f"content-length: {length}\r\n{extra}\r\n").encode()


async def _status(reader: asyncio.StreamReader, timeout: float) -> int | None:
    """The status of the response on `reader`: 0 if the server closed without one, None if it
    stayed silent for `timeout`."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        return None
    except ConnectionError:
        return 0
    return _code(line)


async def post_raw(host: str, port: int, path: str, body: bytes, timeout: float) -> dict:
    """Send `body` (in 1 MiB writes, as fast as the server takes them) and read the status."""
    begin = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    status = None
    try:
        writer.write(_head(path, len(body)))
        read = asyncio.create_task(_status(reader, timeout))  # a refusal may come before the body is sent
        for at in range(0, len(body), 1 << 20):
            if read.done():
                break
            writer.write(body[at:at + (1 << 20)])
            try:
                await asyncio.wait_for(writer.drain(), timeout)
            except (TimeoutError, ConnectionError):
                break
        status = await read
    finally:
        writer.close()
    return {"status": status, "answer_s": time.perf_counter() - begin}


async def stalled_bodies(host: str, port: int, n: int, timeout: float) -> dict:
    """n connections that send headers for a 100 KB body and 1 byte of it; each one's status (408
    from a server with a body deadline) and when the server answered or closed it."""
    return await _connections(host, port, n, timeout, _head("/v1/completions", 100_000) + b"{")


async def idle_connections(host: str, port: int, n: int, timeout: float) -> dict:
    """n connections that send nothing; how many the server closed, and when the last one went."""
    return await _connections(host, port, n, timeout, b"")


async def _connections(host: str, port: int, n: int, timeout: float, first: bytes) -> dict:
    """n connections at once, each sending `first` and then waiting for the server's answer."""
    begin = time.perf_counter()

    async def one():
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(first)
            await writer.drain()
            status = await _status(reader, timeout)
            return status, None if status is None else time.perf_counter() - begin
        finally:
            writer.close()

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    return _summary(results, begin, timeout)


def _code(data: bytes) -> int:
    """A closed connection's last words: its status, or 0 when it closed without any."""
    parts = data.split(maxsplit=2)
    return int(parts[1]) if data.startswith(b"HTTP/") and len(parts) > 1 and parts[1].isdigit() else 0


def _summary(results: list, begin: float, timeout: float) -> dict:
    errors = [r for r in results if isinstance(r, BaseException)]
    done = [r for r in results if not isinstance(r, BaseException)]
    statuses: dict[str, int] = {}
    for status, _ in done:
        key = "open" if status is None else ("closed" if status == 0 else str(status))
        statuses[key] = statuses.get(key, 0) + 1
    ends = [t for s, t in done if t is not None]
    return {"statuses": statuses, "client_errors": len(errors),
            "answer_s": max(ends) if ends and len(ends) == len(done) else None,
            "detail": f"{len(done)} connections; still open after {timeout:g} s: {statuses.get('open', 0)}"}


async def slow_reader(url: str, tokens: int, pause: float) -> dict:
    """A stream of `tokens` tokens read one chunk per `pause` seconds: it must still arrive whole."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": tokens, "ignore_eos": True,
            "stream": True}
    begin, chunks, done = time.perf_counter(), 0, False
    async with httpx.AsyncClient(timeout=120) as client, \
            client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks += 1
                await asyncio.sleep(pause)
    return {"status": r.status_code, "answer_s": time.perf_counter() - begin,
            "detail": f"{chunks} chunks, [DONE] {'seen' if done else 'missing'}", "ok": done and chunks == tokens}


def normal_request(url: str) -> bool:
    try:
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "To be", "max_tokens": 4},
                       timeout=60)
        return r.status_code == 200 and len(r.json()["choices"]) == 1
    except httpx.HTTPError:
        return False


# --- running them -----------------------------------------------------------------------------------
@dataclass
class Row:
    attack: str
    result: dict = field(default_factory=dict)
    health_worst_ms: float | None = None
    health_failures: int = 0
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    after_ok: bool | None = None


def measure(url: str, pid: int | None, name: str, attack, settle: float = 1.0) -> Row:
    """Run one attack (a coroutine factory) under the /health probe; RSS before and `settle` s
    after; then a normal request."""
    row = Row(name, rss_before_mb=rss_mb(pid))
    with HealthProbe(url) as probe:
        row.result = asyncio.run(attack())
    time.sleep(settle)
    row.health_worst_ms, row.health_failures = probe.worst_ms, probe.failures
    row.rss_after_mb = rss_mb(pid)
    row.after_ok = normal_request(url)
    log(f"{name}: {row.result} (health worst {row.health_worst_ms or 0:.0f} ms)")
    return row


def body_attacks(url: str, timeout: float) -> list[tuple[str, object]]:
    host, port = httpx.URL(url).host, httpx.URL(url).port
    words = lambda n: json.dumps({"model": MODEL, "prompt": "word " * n, "max_tokens": 4}).encode()  # noqa: E731
    nested = b'{"model": "dsv2-bundled", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    not_utf8 = b'{"model": "dsv2-bundled", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    return [
        ("10 MB body", lambda: post_raw(host, port, "/v1/completions", words(2_000_000), timeout)),
        ("60 MB body", lambda: post_raw(host, port, "/v1/completions", words(12_000_000), timeout)),
        ("JSON nested 100,000 deep", lambda: post_raw(host, port, "/v1/chat/completions", nested, timeout)),
        ("invalid UTF-8", lambda: post_raw(host, port, "/v1/chat/completions", not_utf8, timeout)),
        ("200 stalled bodies", lambda: stalled_bodies(host, port, 200, timeout)),
        ("1,000 idle connections", lambda: idle_connections(host, port, 1000, timeout)),
        ("slow stream reader", lambda: slow_reader(url, 400, 0.01)),
    ]


def fault_attacks(url: str, proc: subprocess.Popen, timeout: float) -> list[Row]:
    """On a server started through FAULTS: a failing step, then a dead engine (which ends it)."""
    rows = []
    for name, token, want in (("engine step out of memory", STEP_FAULT, "survives"),
                              ("engine loop exception", DEAD_FAULT, "exits")):
        row = Row(name, rss_before_mb=rss_mb(proc.pid))
        begin = time.perf_counter()
        with HealthProbe(url, timeout=2.0) as probe:
            try:
                r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": [5, token, 6],
                                                              "max_tokens": 4}, timeout=timeout)
                status, detail = r.status_code, r.json()["error"]["message"][:100]
            except (httpx.HTTPError, KeyError, ValueError) as e:
                status, detail = None, repr(e)[:100]
            answer = time.perf_counter() - begin
            if want == "exits":
                try:
                    code = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    code = None
                detail += f"; server exit code {code} after {time.perf_counter() - begin:.1f} s"
        row.result = {"status": status, "answer_s": answer, "detail": detail}
        row.health_worst_ms, row.health_failures = probe.worst_ms, probe.failures
        row.after_ok = normal_request(url) if want == "survives" else None
        rows.append(row)
        log(f"{name}: {row.result}")
    return rows


def sigterm_mid_stream(url: str, proc: subprocess.Popen, timeout: float) -> Row:
    """SIGTERM while a long stream runs: the stream's last events, and how the process ends."""
    row = Row("SIGTERM mid-stream", rss_before_mb=rss_mb(proc.pid))
    events, signalled = [], None
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 5:
                        proc.send_signal(signal.SIGTERM)
                        signalled = time.perf_counter()
    except httpx.HTTPError as e:
        events.append(f"client error: {e!r}")
    ended = time.perf_counter()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    last = events[-2] if len(events) > 1 else (events[-1] if events else "")
    row.result = {"status": r.status_code, "answer_s": None if signalled is None else ended - signalled,
                  "exit_code": code, "exit_s": None if signalled is None else time.perf_counter() - signalled,
                  "done": bool(events) and events[-1] == "[DONE]", "last_event": last[:200],
                  "detail": f"{len(events)} events; last before [DONE]: {last[:80]}"}
    log(f"SIGTERM: {row.result}")
    return row


# --- main ---------------------------------------------------------------------------------------------
def print_table(rows: list[Row]) -> None:
    print(f"\n{'attack':<28}{'answer':>22}{'after s':>9}{'/health worst ms':>18}{'fails':>7}"
          f"{'RSS MB before→after':>22}{'then':>7}")
    for row in rows:
        res = row.result
        answer = res.get("status") if "status" in res else res.get("statuses")
        rss = ("—" if row.rss_before_mb is None or row.rss_after_mb is None
               else f"{row.rss_before_mb:,.0f}→{row.rss_after_mb:,.0f}")
        after = res.get("answer_s")
        print(f"{row.attack:<28}{str(answer):>22}{'—' if after is None else f'{after:.2f}':>9}"
              f"{'—' if row.health_worst_ms is None else f'{row.health_worst_ms:.0f}':>18}{row.health_failures:>7}"
              f"{rss:>22}{'—' if row.after_ok is None else ('ok' if row.after_ok else 'FAIL'):>7}")
        if res.get("detail"):
            print(f"{'':<28}{res['detail']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="attack this running server instead of starting one")
    p.add_argument("--pid", type=int, help="its process id, for RSS (with --url)")
    p.add_argument("--serve-args", default="", help="extra `dsv2 serve` arguments for the servers started here")
    p.add_argument("--term-args", default="", help="more of them for the server that gets SIGTERM "
                                                   "(e.g. --shutdown-timeout 2, to see a stream cut)")
    p.add_argument("--attack-timeout", type=float, default=20.0, help="seconds to wait for an attack's answer")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 1,000 connections need as many descriptors
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(4096, hard)), hard))
    serve_args = ["--device", "cpu", *shlex.split(args.serve_args)]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            for name, attack in body_attacks(args.url, args.attack_timeout):
                rows.append(measure(args.url, args.pid, name, attack))
        else:
            url, proc = start_server(serve_args, Path(tmp) / "serve.log", args.startup_timeout)
            try:
                for name, attack in body_attacks(url, args.attack_timeout):
                    rows.append(measure(url, proc.pid, name, attack))
            finally:
                stop_server(proc)
            url, proc = start_server(serve_args, Path(tmp) / "faults.log", args.startup_timeout,
                                     launcher=[sys.executable, "-c", FAULTS])
            try:
                rows += fault_attacks(url, proc, args.attack_timeout)
            finally:
                stop_server(proc)
            url, proc = start_server(serve_args + shlex.split(args.term_args), Path(tmp) / "term.log",
                                     args.startup_timeout)
            try:
                rows.append(sigterm_mid_stream(url, proc, args.attack_timeout + 40))
            finally:
                stop_server(proc)
                log("server output at SIGTERM:\n" + (Path(tmp) / "term.log").read_text()[-1500:])
    print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"serve_args": serve_args, "date": time.strftime("%Y-%m-%d"),
                                        "git": _git_head(), "rows": [r.__dict__ for r in rows]}, indent=2) + "\n")
    return 0


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())

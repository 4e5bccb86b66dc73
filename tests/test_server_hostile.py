"""`dsv2 serve` under hostile clients and faults: bench/hostile_bench.py's attacks against real
servers, asserted. Each body or connection attack must get its status, /health must answer within
200 ms while it runs (probed from another process every 50 ms), the server's RSS must come back
near where it was, and a normal request must work afterwards. Then: the connection cap, SIGTERM in
the middle of a stream (bounded drain, a final error event, every page free, exit 0), and failures
injected into the engine (a failing step costs its requests only; a dead engine fails everyone,
turns /health to 503 and exits 1).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time

import httpx
import pytest

from bench.hostile_bench import DEAD_FAULT, FAULTS, MODEL, STEP_FAULT, body_attacks, measure
from dsv2.server.limits import raise_open_files_limit

from .server_util import running_server

HEALTH_MS = 200
RSS_MB = 64  # what an attack may leave behind in the server (its baseline is ~4.5 GB: the KV cache)
WANT = {
    "10 MB body": {"status": 413}, "60 MB body": {"status": 413},
    "JSON nested 100,000 deep": {"status": 400}, "invalid UTF-8": {"status": 400},
    "200 stalled bodies": {"statuses": {"408": 200}, "client_errors": 0},
    "1,000 idle connections": {"statuses": {"closed": 1000}, "client_errors": 0},
    "slow stream reader": {"status": 200, "ok": True},
}


@pytest.fixture(scope="module")
def server():
    raise_open_files_limit(4096)  # this process opens 1,000 connections
    with running_server("--header-timeout", "1", "--body-timeout", "1") as (url, proc):
        # a first request of each kind, so that no first-use cost lands inside an attack
        httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "warm", "max_tokens": 2}, timeout=60)
        yield url, proc


@pytest.mark.parametrize("name", list(WANT))
def test_attack(server, name):
    url, proc = server
    attack = dict(body_attacks(url, timeout=15.0))[name]
    row = measure(url, proc.pid, name, attack)
    for key, value in WANT[name].items():
        assert row.result[key] == value, (key, row.result)
    assert row.health_failures == 0 and row.health_worst_ms < HEALTH_MS, row
    assert row.rss_after_mb < row.rss_before_mb + RSS_MB, row
    assert row.after_ok, proc.output[-3000:]


def test_refusals_are_counted(server):
    text = httpx.get(server[0] + "/metrics").text
    counts = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("dsv2_refused_total{")}
    assert counts["too_large"] >= 2 and counts["body_timeout"] >= 200 and counts["header_timeout"] >= 1000, counts


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(server):
    """Under the size limit but over the context by its bytes alone: refused at once (tokenizing
    900 KB would take over a second on this machine)."""
    begin = time.perf_counter()
    r = httpx.post(server[0] + "/v1/completions", json={"model": MODEL, "prompt": "word " * 180_000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "at least" in r.json()["error"]["message"] and time.perf_counter() - begin < 0.5


def test_declared_size_is_refused_before_the_body(server):
    """Content-Length over the limit: 413 arrives while the client has sent none of the body."""
    host, port = "127.0.0.1", httpx.URL(server[0]).port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 50000000\r\n\r\n")
        answer = b""
        while b"request_too_large" not in answer and (chunk := s.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"connection: close" in answer.lower() and b"request_too_large" in answer


# --- the connection cap and SIGTERM ------------------------------------------------------------------
@pytest.fixture(scope="module")
def draining_server():
    with running_server("--max-connections", "8", "--header-timeout", "5", "--shutdown-timeout", "1") as served:
        yield served


def test_connections_beyond_the_cap_get_503(draining_server):
    url, _ = draining_server
    port = httpx.URL(url).port
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    try:
        time.sleep(0.2)
        r = httpx.get(url + "/health", timeout=5)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "server_busy"
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_sigterm_drains_then_cuts_the_stream_and_exits_clean(draining_server):
    url, proc = draining_server
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    events, refused, health, signalled = [], None, None, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 3:
                proc.send_signal(signal.SIGTERM)
                signalled = time.perf_counter()
                time.sleep(0.2)
                refused = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=5)
                health = httpx.get(url + "/health", timeout=5)
    cut_after = time.perf_counter() - signalled
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down", events[-3:]
    assert 1.0 <= cut_after < 3.0  # --shutdown-timeout 1: the stream ran on until then, no longer
    assert len(events) > 5
    assert proc.wait(timeout=15) == 0
    out = proc.output
    assert "1 requests cut at the deadline" in out, out[-2000:]
    free, total = out.split("KV cache: ")[1].split(" blocks free")[0].split(" of ")
    assert free == total, out[-2000:]


# --- faults in the engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faulty_server():
    with running_server(launcher=[sys.executable, "-c", FAULTS]) as served:
        yield served


def _metric(url: str, name: str) -> float:
    lines = [line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[-1])


def test_a_failing_step_fails_its_requests_only(faulty_server):
    url, _ = faulty_server
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": [5, STEP_FAULT, 6], "max_tokens": 4},
                   timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_step_failed", r.text
    assert "OutOfMemoryError" in r.json()["error"]["message"]
    assert _metric(url, "dsv2_engine_step_errors_total") == 1
    assert httpx.get(url + "/health").status_code == 200
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "To be", "max_tokens": 4}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_a_dead_engine_fails_everyone_and_exits_nonzero(faulty_server):
    url, proc = faulty_server
    health: list[int | None] = []

    async def poll(client):
        while True:
            try:
                health.append((await client.get(url + "/health")).status_code)
            except httpx.HTTPError:
                health.append(None)
            await asyncio.sleep(0.01)

    async def scenario():
        async with httpx.AsyncClient(timeout=30) as client:
            poller = asyncio.create_task(poll(client))
            body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True,
                    "stream": True}
            async with client.stream("POST", url + "/v1/completions", json=body) as stream:
                lines = stream.aiter_lines()
                first = await anext(lines)  # running in the engine now
                fatal = await client.post(url + "/v1/completions",
                                          json={"model": MODEL, "prompt": [5, DEAD_FAULT], "max_tokens": 4})
                rest = [line async for line in lines if line.startswith("data: ")]
            await asyncio.sleep(0.3)
            poller.cancel()
            return first, fatal, rest

    first, fatal, rest = asyncio.run(scenario())
    assert first.startswith("data: ")
    assert fatal.status_code == 500 and fatal.json()["error"]["code"] == "engine_dead", fatal.text
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "engine_dead", rest[-2:]
    assert health[0] == 200 and 503 in health, health  # healthy, then 503, then gone
    assert proc.wait(timeout=15) == 1
    assert "injected: the engine's state is broken" in proc.output

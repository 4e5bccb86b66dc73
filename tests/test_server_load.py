"""`dsv2 serve` under load: 500 streaming completions at once against a CPU server of the bundled
model, through bench/server_bench.py's client and checks. Every stream carries exactly max_tokens
token chunks matching its usage, the server ends idle with every cache block free, and clients that
hang up mid-stream are each counted as one abort."""

from __future__ import annotations

import pytest

from bench.server_bench import Load, measure

from .server_util import running_server

REQUESTS = 500


@pytest.fixture(scope="module")
def server():
    # both loads on one server: the checks compare its counters before and after each
    with running_server() as (url, _):
        yield url


def _assert_ok(res: dict) -> None:
    failed = [f"{c['name']}: {c['detail']}" for c in res["checks"] if not c["ok"]]
    assert res["ok"], "; ".join(failed)


def test_500_concurrent_streams(server):
    res = measure(server, Load(requests=REQUESTS, prompt_len=16, max_tokens=8))
    _assert_ok(res)
    assert res["summary"]["completed"] == REQUESTS


def test_500_streams_with_early_disconnects(server):
    res = measure(server, Load(requests=REQUESTS, prompt_len=16, max_tokens=8, disconnect_frac=0.2, seed=1))
    _assert_ok(res)
    s = res["summary"]
    assert s["disconnected"] == REQUESTS // 5 and s["completed"] == REQUESTS - REQUESTS // 5

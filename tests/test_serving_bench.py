"""bench/serving_bench.py: the lengths it draws hold the anchor's workload, and its --smoke run (a
CPU server of the bundled model, 12 requests at a Poisson rate and then all at once) succeeds with
every request's exact lengths and writes the report's fields."""

from __future__ import annotations

import json
import statistics

from bench.serving_bench import ANCHOR, Workload, draw_lengths, main, send_offsets


def test_lengths_hold_the_anchors_totals_within_sharegpts_filter():
    inputs, outputs = draw_lengths(Workload(), max_model_len=4096)
    assert len(inputs) == len(outputs) == ANCHOR["requests"]
    # 236K input and 216K output tokens over 1,000 requests, as the anchor's ShareGPT sample
    assert abs(sum(inputs) - ANCHOR["input_tokens"]) <= 500 and abs(sum(outputs) - ANCHOR["output_tokens"]) <= 500
    assert min(inputs + outputs) >= 4 and max(inputs) <= 1024 and max(map(sum, zip(inputs, outputs))) <= 2048
    assert statistics.median(inputs) < statistics.fmean(inputs) / 1.3  # long-tailed: most prompts short
    assert draw_lengths(Workload(), 4096) == (inputs, outputs)  # seeded
    short_in, short_out = draw_lengths(Workload(), max_model_len=512)
    assert max(map(sum, zip(short_in, short_out))) <= 512


def test_poisson_offsets():
    offsets = send_offsets(4000, 8.0, 1.0, seed=0)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert abs(statistics.fmean(gaps) - 1 / 8) < 0.01 and abs(statistics.stdev(gaps) - 1 / 8) < 0.01  # exponential
    assert send_offsets(5, float("inf"), 1.0, seed=0) == [0.0] * 5


def test_smoke(tmp_path):
    out = tmp_path / "serving.json"
    res = main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    failed = [f"{c['name']}: {c['detail']}" for c in res["checks"] if not c["ok"]]
    assert res["ok"], "; ".join(failed)
    assert [r["request_rate"] for r in res["runs"]] == [40.0, "inf"]
    assert res["client"] in ("aiohttp", "httpx") and res["corpus"] and res["max_model_len"] == 4096
    for run in res["runs"]:
        s, records = run["summary"], run["records"]
        assert len(records) == s["successful"] == 12 and s["failed"] == 0
        assert all(r["tokens"] == r["out"] and "error" not in r for r in records)  # ignore_eos held every length
        assert s["total_input_tokens"] == sum(r["in"] for r in records)
        assert s["total_output_tokens"] == sum(r["out"] for r in records)
        assert s["output_tok_s"] == s["total_output_tokens"] / s["duration_s"]
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(s[key]) == {"mean", "median", "p99"} and s[key]["median"] > 0
        assert 0 < s["goodput_requests_s"] <= s["requests_s"]
    assert res["versus_anchor"]["requests_s_ratio"] > 0 and not res["versus_anchor"]["comparable"]

"""bench/host_bench.py at a tiny size: both output kinds measured, the forward taken out."""

from __future__ import annotations

import json

from bench import host_bench


def test_host_bench_smoke(tmp_path):
    res = host_bench.main(["--batches", "16", "--steps", "3", "--out", str(tmp_path / "host.json")])
    assert [r["output_kind"] for r in res["rows"]] == ["cumulative", "final_only"]
    for r in res["rows"]:
        assert 0 < r["forward_ms"] < r["step_ms"] and r["host_us_per_row"] > 0
    assert json.loads((tmp_path / "host.json").read_text())["rows"][0]["batch"] == 16

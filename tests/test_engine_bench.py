"""The engine benchmark end to end on CPU with the tiny presets (seconds): every section yields
figures, the JSON holds them and the plot redraws from it."""

import json

from bench import engine_bench


def test_engine_bench_quick_cpu(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    res = engine_bench.main(["--quick", "--device", "cpu", "--max-throughput", "--batches", "1,4",
                             "--prefill", "2x16", "--sections", "decode,prefill,longctx", "--lc-prefill", "600",
                             "--lc-decode", "2x300", "--out", str(out), "--plot", str(png)])
    saved = json.loads(out.read_text())
    assert saved["preset"] == "dsv2-tiny" and png.stat().st_size > 0
    for row in res["decode"]:
        r = row["dsv2"]
        assert r["status"] == "ok" and r["every_step_full"] and r["tokens"] == row["batch"] * r["steps"]
        assert r["preemptions"] == 0 and 0 < row["limit"]["tok_s"]
    # one engine step per prefill repeat, and one that reads its tokens back (async scheduling)
    assert res["prefill"][0]["dsv2"]["steps"] == [2, 2]
    mt = res["max_throughput"]["models"]
    assert all(r["status"] in ("ok", "skipped") for r in mt.values())
    assert mt["dsv2-tiny"]["batch"] == min(mt["dsv2-tiny"]["sequences_fit"], 32)
    tiny = mt["dsv2-tiny"]
    # tokens counted from the sequences: every generated token is in one of the phases, and a
    # timed step decodes at most the batch (fewer as the first admitted sequences finish)
    assert tiny["decode_tokens"] <= sum(tiny["decode_rows_per_step"]) <= tiny["batch"] * tiny["decode_steps"]
    assert tiny["decode_rows_mean"] == tiny["decode_tokens"] / tiny["decode_steps"]
    lc = saved["longctx"]  # a prompt longer than a step's 256 tokens, prefilled in chunks
    # three chunks, then the step that reads the token back (async scheduling)
    assert lc["prefill"][0]["dsv2"]["steps"] == 4 and lc["decode"][0]["dsv2"]["every_step_full"]
    assert lc["prefix"]["second_cached_tokens"] == 256  # the document's whole blocks, from the prefix cache
    png.unlink()
    engine_bench.main(["--plot-only", str(out), "--plot", str(png)])
    assert png.stat().st_size > 0


def test_expected_experts():
    assert engine_bench.expected_experts(64, 6, 1) == 6
    assert abs(engine_bench.expected_experts(64, 6, 10_000) - 64) < 1e-9

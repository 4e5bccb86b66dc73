"""FP8 weights against bf16 in the engine, at the DeepSeek-V2-Lite shape (random weights, one GPU):
the same rows for both in the same run, each beside its physical limit, and transformers' FP8 path
on the same FP8 checkpoint where it runs.

    python bench/fp8_engine_bench.py --out bench/results/fp8_engine_h200.json
    python bench/fp8_engine_bench.py --sections kernels          # the kernels alone, ~1 min
    python bench/fp8_engine_bench.py --sections engine,hf        # + transformers' FP8 (writes a 16 GB checkpoint)

Sections:
- kernels: each FP8 kernel against the bf16 path it replaces, on V2-Lite's shapes: the few-row
  linear (q_proj with kv_a_proj_with_mqa, o_proj), one MoE layer's fused experts at batch 1 and 64,
  and the prefill GEMMs (o_proj over 2048 tokens; the routed experts' gate_up over 2048 tokens,
  uniform routing) against cuBLAS / CUTLASS in bf16. Limits: weight bytes over the copy bandwidth
  (decode kernels) and FLOPs over the measured dense peak of each dtype (prefill GEMMs).
- engine: bench/engine_bench.py's decode rows (batch 1 and 64, a 512-token prompt) and prefill rows
  (1x2048, 8x512) for a bf16 and an FP8 model built from the same random weights, the weights in
  memory, and the cache tokens that fit at gpu_memory_utilization 0.9. Limits as engine_bench's, with
  the FP8 model's own (smaller) weight bytes and the FP8 peak for its prefill.
- tune-decode: the FP8 decode kernels' launch choices (kernels/small_linear.py's FP8_TILE,
  kernels/moe_gemm.py's FP8_CONFIG) on the same shapes, each time and its copy-bandwidth limit.
- hf: the FP8 model saved as an FP8 checkpoint and loaded by transformers (its fine-grained FP8
  path), decode at batch 1 and prefill 1x2048, on the same prompts.

Peaks are measured in the run: a 8192^3 bf16 matmul and a 8192^3 FP8 one (torch._scaled_mm with
tensor-wise scales), best of 5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine_bench import (  # noqa: E402
    copy_bandwidth, decode_limit, dsv2_decode, dsv2_prefill, free_memory, guarded, hf_decode, hf_prefill,
    kv_bytes_per_token, log, prefill_limit, sync, weight_bytes,
)
from dsv2.checkpoint import random_model, save_model  # noqa: E402
from dsv2.config import preset  # noqa: E402
from dsv2.engine import LLMEngine  # noqa: E402
from dsv2.engine.engine import EngineConfig  # noqa: E402
from dsv2.model import fp8  # noqa: E402
from dsv2.model.fp8_layers import quantize_model_  # noqa: E402
from dsv2.model.kernels.fp8_gemm import fp8_grouped_mm, fp8_linear  # noqa: E402
from dsv2.model.kernels.moe_gemm import fused_experts  # noqa: E402
from dsv2.model.kernels.small_linear import small_linear, small_linear_fp8  # noqa: E402
from dsv2.model.moe import grouped_mm  # noqa: E402


def timed(fn, reps: int = 20, calls: int = 10) -> float:
    """Median seconds of one fn() call, from replays of a CUDA graph of `calls` calls (as the engine
    runs them: no Python launch overhead), after a warm call that compiles the kernels."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]


def peaks(device) -> dict:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    bf16 = 2 * n**3 / timed(lambda: a @ b, reps=5, calls=3)
    qa, qb = a.to(fp8.FP8), b.to(fp8.FP8).t()
    one = torch.ones((), device=device)
    f8 = 2 * n**3 / timed(lambda: torch._scaled_mm(qa, qb, one, one, out_dtype=torch.bfloat16), reps=5, calls=3)
    return {"bf16_flops": bf16, "fp8_flops": f8}


def _q(w):
    return fp8.quantize(w)


def _q3(w):
    qs = [fp8.quantize(m) for m in w]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def _decode_batch(config, device, g, randn, batch: int):
    """One MoE layer's decode inputs: x, distinct top-k experts per token, gate values, residual, and
    the experts touched (routed + shared)."""
    d, e, k = config.hidden_size, config.n_routed_experts, config.num_experts_per_tok
    x = randn(batch, d) * d ** 0.5
    idx = torch.stack([torch.randperm(e, device=device, generator=g)[:k] for _ in range(batch)])
    weight = torch.rand(batch, k, device=device, generator=g)
    return x, idx, weight, randn(batch, d), idx.unique().numel() + config.n_shared_experts


@torch.inference_mode()
def kernels(config, device, bandwidth: float, peak: dict) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    d, h = config.hidden_size, config.num_attention_heads
    randn = lambda *s: torch.randn(*s, device=device, generator=g, dtype=torch.bfloat16) / s[-1] ** 0.5  # noqa: E731

    def row(name, bf16_fn, fp8_fn, bytes_bf16=None, bytes_fp8=None, flops=None):
        t16, t8 = timed(bf16_fn), timed(fp8_fn)
        r = {"kernel": name, "bf16_us": t16 * 1e6, "fp8_us": t8 * 1e6, "speedup": t16 / t8}
        if bytes_bf16:
            r |= {"limit_bf16_us": bytes_bf16 / bandwidth * 1e6, "limit_fp8_us": bytes_fp8 / bandwidth * 1e6}
        if flops:
            r |= {"limit_bf16_us": flops / peak["bf16_flops"] * 1e6, "limit_fp8_us": flops / peak["fp8_flops"] * 1e6,
                  "bf16_tflops": flops / t16 / 1e12, "fp8_tflops": flops / t8 / 1e12}
        log(f"  {name}: bf16 {t16 * 1e6:.1f} us, fp8 {t8 * 1e6:.1f} us ({t16 / t8:.2f}x)")
        rows.append(r)

    q_out = h * config.qk_head_dim
    wq, wkv, wo = randn(q_out, d), randn(config.kv_lora_rank + config.qk_rope_head_dim, d), randn(d, h * config.v_head_dim)
    (qq, sq), (qkv, skv), (qo, so) = _q(wq), _q(wkv), _q(wo)
    for m in (1, 4):
        x = randn(m, d) * d ** 0.5
        row(f"q_proj + kv_a, {m} row(s)", lambda x=x: small_linear(x, wq, wkv),
            lambda x=x: small_linear_fp8(x, [qq, qkv], [sq, skv], torch.bfloat16),
            2 * (wq.numel() + wkv.numel()), wq.numel() + wkv.numel() + 4 * (sq.numel() + skv.numel()))
    x = randn(1, wo.shape[1]) * wo.shape[1] ** 0.5
    row("o_proj, 1 row", lambda: small_linear(x, wo), lambda: small_linear_fp8(x, [qo], [so], torch.bfloat16),
        2 * wo.numel(), wo.numel() + 4 * so.numel())

    e, inter, k = config.n_routed_experts, config.moe_intermediate_size, config.num_experts_per_tok
    s_inter = config.n_shared_experts * inter
    wg, wu, wd = randn(e, inter, d), randn(e, inter, d), randn(e, d, inter)
    sg, su, sd = randn(s_inter, d), randn(s_inter, d), randn(d, s_inter)
    (qg, qsg), (qu, qsu), (qd, qsd) = _q3(wg), _q3(wu), _q3(wd)
    (qsg2, ssg), (qsu2, ssu), (qsd2, ssd) = _q(sg), _q(su), _q(sd)
    per_expert = 3 * inter * d
    for batch in (1, 64):
        x, idx, weight, res, touched = _decode_batch(config, device, g, randn, batch)
        row(f"MoE experts, batch {batch} ({touched} experts)",
            lambda x=x, idx=idx, weight=weight, res=res: fused_experts(x, idx, weight, wg, wu, wd, (sg, su, sd), res),
            lambda x=x, idx=idx, weight=weight, res=res: fused_experts(
                x, idx, weight, qg, qu, qd, (qsg2, qsu2, qsd2), res, (qsg, qsu, qsd), (ssg, ssu, ssd)),
            2 * touched * per_expert, touched * per_expert * (1 + 4 / 128**2))

    tokens = 2048
    x = randn(tokens, wo.shape[1]) * wo.shape[1] ** 0.5
    row(f"o_proj, {tokens} tokens", lambda: F.linear(x, wo), lambda: fp8_linear(x, qo, so),
        flops=2 * tokens * wo.numel())
    wgu = torch.cat([wg, wu], 1)
    qgu, sgu = torch.cat([qg, qu], 1), torch.cat([qsg, qsu], 1)
    counts = torch.bincount(torch.randint(0, e, (tokens * k,), device=device, generator=g), minlength=e)
    xs = randn(tokens * k, d) * d ** 0.5
    row(f"experts' gate_up, {tokens} tokens x top-{k}", lambda: grouped_mm(xs, wgu, counts),
        lambda: fp8_grouped_mm(xs, qgu, sgu, counts), flops=2 * tokens * k * wgu.shape[1] * d)
    return rows


@torch.inference_mode()
def tune(config, device) -> list[dict]:
    """The block-scaled GEMM's tile choices on V2-Lite's prefill shapes (and cuBLAS's own 1 x 128 by
    128 x 128 block-scaled FP8 GEMM, torch._scaled_mm, where this torch has it), microseconds each."""
    from dsv2.model.kernels import fp8_gemm as k

    g = torch.Generator(device=device).manual_seed(1)
    d, e, top = config.hidden_size, config.n_routed_experts, config.num_experts_per_tok
    inter = config.moe_intermediate_size
    shapes = [("o_proj 2048 tokens", 2048, 2048, 2048, 1), ("q_proj 2048 tokens", 2048, 3072, 2048, 1),
              ("dense up 2048 tokens", 2048, config.intermediate_size, 2048, 1),
              ("experts gate_up 2048 tokens", 2048 * top, 2 * inter, d, e),
              ("experts down 2048 tokens", 2048 * top, d, inter, e)]
    configs = [(64, 128, 4, 4), (64, 128, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3),
               (64, 256, 8, 3), (128, 256, 8, 3)]
    rows = []
    for name, m, n, kk, experts in shapes:
        x = torch.randn(m, kk, device=device, generator=g, dtype=torch.bfloat16)
        w = torch.randn(experts, n, kk, device=device, generator=g, dtype=torch.bfloat16) / kk ** 0.5
        q, s = _q3(w)
        counts = torch.bincount(torch.randint(0, experts, (m,), device=device, generator=g), minlength=experts)
        offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        a, a_s = k.act_quant(x)
        out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
        r = {"shape": name, "m": m, "n": n, "k": kk, "experts": experts,
             "act_quant_us": timed(lambda x=x: k.act_quant(x)) * 1e6}
        flops = 2 * m * n * kk
        for bm, bn, warps, stages in configs:
            def launch(bm=bm, bn=bn, warps=warps, stages=stages, a=a, a_s=a_s, q=q, s=s, out=out, offsets=offsets):
                dense = experts == 1
                tiles = -(-m // bm) + (0 if dense else experts - 1)
                k._fp8_gemm_kernel[(tiles, -(-n // bn))](
                    a, a_s, q, s, out, out if dense else offsets, m, n, kk, experts, n, -(-n // 128),
                    a.stride(0), a_s.stride(0), q.stride(0), q.stride(1), s.stride(0), s.stride(1), out.stride(0),
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, BLOCK_E=max(2, 1 << (experts - 1).bit_length()),
                    DENSE=dense, num_warps=warps, num_stages=stages)
            t = guarded(f"{name} {bm}x{bn}", lambda launch=launch: {"status": "ok", "us": timed(launch) * 1e6})
            r[f"{bm}x{bn} w{warps} s{stages}"] = t.get("us", t.get("error", t.get("status")))
        if experts == 1:
            wt = w[0].to(fp8.FP8)
            r["bf16_cublas_us"] = timed(lambda x=x, w=w: F.linear(x, w[0])) * 1e6
            a_col = a_s.t().contiguous().t()  # (M, K/128), outer-dim-major

            def cublas_fp8(a=a, a_col=a_col, q=q, s=s):
                return torch._scaled_mm(a, q[0].t(), a_col, s[0].t(), out_dtype=torch.bfloat16)
            t = guarded(f"{name} _scaled_mm", lambda cublas_fp8=cublas_fp8: {"status": "ok", "us": timed(cublas_fp8) * 1e6})
            r["scaled_mm_blockwise_us"] = t.get("us", t.get("error", t.get("status")))
            del wt
        else:
            r["bf16_grouped_us"] = timed(lambda x=x, w=w, counts=counts: grouped_mm(x, w, counts)) * 1e6
        best = min((v, key) for key, v in r.items() if key[0].isdigit() and isinstance(v, float))
        r["best"], r["best_tflops"] = best[1], flops / best[0] / 1e6
        log(f"  {name}: best {best[1]} {best[0]:.1f} us ({r['best_tflops']:,.0f} TFLOP/s); "
            f"bf16 {r.get('bf16_cublas_us', r.get('bf16_grouped_us')):.1f} us; cuBLAS FP8 {r.get('scaled_mm_blockwise_us')}")
        rows.append(r)
    return rows


SMALL_LINEAR_TILES = [(2048, 1024, 4, 4), (4096, 1024, 4, 4), (4096, 2048, 4, 4), (4096, 2048, 8, 4),
                      (2048, 2048, 4, 4), (8192, 2048, 8, 3), (1024, 1024, 4, 4), (2048, 512, 4, 4)]
MOE_SWIGLU = [(32, 1, 4, 3), (32, 2, 4, 3), (32, 4, 4, 2), (64, 1, 4, 3), (64, 2, 4, 3), (16, 2, 4, 3),
              (32, 2, 8, 3), (128, 1, 4, 3), (64, 2, 8, 3), (16, 4, 4, 3)]
MOE_DOWN = [(64, 1, 4, 4), (64, 2, 4, 3), (32, 2, 4, 3), (128, 1, 4, 4), (64, 4, 4, 2), (128, 2, 8, 3),
            (32, 1, 4, 4), (32, 4, 4, 3)]


@torch.inference_mode()
def tune_decode(config, device, bandwidth: float) -> dict:
    """The FP8 decode kernels' launch choices on V2-Lite's shapes: kernels/small_linear.py's FP8_TILE
    (q_proj + kv_a at 1 and 4 rows, o_proj at 1 row) and kernels/moe_gemm.py's FP8_CONFIG (one MoE
    layer at batch 1 and 64: the SwiGLU GEMM's choices with the down GEMM's default, then the down
    GEMM's with the best SwiGLU one), microseconds each, each output checked against the default's."""
    from dsv2.model.kernels import moe_gemm, small_linear as sl

    g = torch.Generator(device=device).manual_seed(2)
    d, h = config.hidden_size, config.num_attention_heads
    randn = lambda *s: torch.randn(*s, device=device, generator=g, dtype=torch.bfloat16) / s[-1] ** 0.5  # noqa: E731
    out = {"small_linear": [], "moe": []}

    def sweep(name, fn, choices, set_choice, nbytes):
        default = fn()
        times = {}
        for c in choices:
            set_choice(c)
            try:
                y = fn()
                ok = all(torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2) for a, b in zip(y, default))
                times[str(c)] = timed(fn) * 1e6 if ok else "wrong result"
            except Exception as e:  # noqa: BLE001 - a choice the compiler or GPU refuses is a row too
                times[str(c)] = f"{type(e).__name__}: {str(e)[:80]}"
        best = min((v, k) for k, v in times.items() if isinstance(v, float))
        log(f"  {name}: best {best[1]} {best[0]:.1f} us ({nbytes / bandwidth * 1e6:.1f} us limit)")
        return {"shape": name, "us": times, "best": best[1], "best_us": best[0], "limit_us": nbytes / bandwidth * 1e6}

    saved_tile = sl.FP8_TILE
    q_out = h * config.qk_head_dim
    wq, wkv, wo = randn(q_out, d), randn(config.kv_lora_rank + config.qk_rope_head_dim, d), randn(d, h * config.v_head_dim)
    (qq, sq), (qkv, skv), (qo, so) = _q(wq), _q(wkv), _q(wo)
    def set_tile(c):
        sl.FP8_TILE = c
    for m in (1, 4):
        x = randn(m, d) * d ** 0.5
        out["small_linear"].append(sweep(
            f"q_proj + kv_a, {m} row(s)", lambda x=x: small_linear_fp8(x, [qq, qkv], [sq, skv], torch.bfloat16),
            SMALL_LINEAR_TILES, set_tile, qq.numel() + qkv.numel()))
        sl.FP8_TILE = saved_tile
    x = randn(1, wo.shape[1]) * wo.shape[1] ** 0.5
    out["small_linear"].append(sweep("o_proj, 1 row", lambda: small_linear_fp8(x, [qo], [so], torch.bfloat16),
                                     SMALL_LINEAR_TILES, set_tile, qo.numel()))
    sl.FP8_TILE = saved_tile

    e, inter = config.n_routed_experts, config.moe_intermediate_size
    s_inter = config.n_shared_experts * inter
    (qg, qsg), (qu, qsu), (qd, qsd) = _q3(randn(e, inter, d)), _q3(randn(e, inter, d)), _q3(randn(e, d, inter))
    (qsg2, ssg), (qsu2, ssu), (qsd2, ssd) = _q(randn(s_inter, d)), _q(randn(s_inter, d)), _q(randn(d, s_inter))
    saved = dict(moe_gemm.FP8_CONFIG)
    for batch in (1, 64):
        x, idx, weight, res, touched = _decode_batch(config, device, g, randn, batch)
        nbytes = touched * 3 * inter * d

        def layer(x=x, idx=idx, weight=weight, res=res):
            return [fused_experts(x, idx, weight, qg, qu, qd, (qsg2, qsu2, qsd2), res, (qsg, qsu, qsd), (ssg, ssu, ssd))]

        def set_part(part):
            def set_choice(c):
                moe_gemm.FP8_CONFIG[part] = c
            return set_choice
        row = sweep(f"MoE batch {batch}, SwiGLU choices", layer, MOE_SWIGLU, set_part("swiglu"), nbytes)
        out["moe"].append(row)
        moe_gemm.FP8_CONFIG["swiglu"] = tuple(int(v) for v in row["best"].strip("()").split(","))
        out["moe"].append(sweep(f"MoE batch {batch}, down choices", layer, MOE_DOWN, set_part("down"), nbytes))
        moe_gemm.FP8_CONFIG.update(saved)
    return out


def engine_rows(config, device, bandwidth: float, peak: dict, args, save) -> dict:
    out = {}
    torch.manual_seed(0)
    bf16 = random_model(config, device, torch.bfloat16)
    sync(device)
    for name in ("bf16", "fp8"):
        model = bf16 if name == "bf16" else quantize_model_(bf16)  # in place: the bf16 rows come first
        sync(device)
        wb = weight_bytes(model)
        r = {"weight_bytes": wb, "weights_gib": wb["total"] / 2**30, "decode": [], "prefill": []}
        log(f"{name}: weights {wb['total'] / 2**30:.2f} GiB")
        for b in args.batches:
            d = guarded(f"{name} decode {b}", lambda b=b: dsv2_decode(
                model, b, args.context, 8, args.decode_steps, 2048, 64, {}))
            kv = d.get("kv_bytes_per_token") or kv_bytes_per_token(config, None)
            context = args.context + 8 + (args.decode_steps + 1) / 2
            r["decode"].append({"batch": b, "dsv2": d, "limit": decode_limit(config, wb, b, context, kv, bandwidth)})
            log(f"  decode batch {b}: {d.get('tok_s', float('nan')):,.0f} tok/s")
            save(out | {name: r})
        for n, s in args.prefill:
            p = guarded(f"{name} prefill {n}x{s}", lambda n=n, s=s: dsv2_prefill(model, n, s, 3, 1, n * s, 64, {}))
            r["prefill"].append({"row": f"{n}x{s}", "dsv2": p, "limit": prefill_limit(
                config, wb, n, s, bandwidth, peak["fp8_flops" if name == "fp8" else "bf16_flops"])})
            log(f"  prefill {n}x{s}: {p.get('tok_s', float('nan')):,.0f} tok/s")
            save(out | {name: r})
        r["cache_tokens"] = guarded(f"{name} cache", lambda model=model: _cache_tokens(model))
        log(f"  cache tokens at 0.9: {r['cache_tokens']}")
        out[name] = r
        save(out)
        free_memory()
    if args.hf:
        out["transformers_fp8"] = guarded("transformers fp8", lambda: hf_rows(bf16, args))
    return out


def _cache_tokens(model) -> dict:
    engine = LLMEngine(model, None, EngineConfig(gpu_memory_utilization=0.9, max_model_len=4096, block_size=64,
                                                 enforce_eager=True))
    tokens = engine.pages.num_blocks * engine.pages.block_size
    del engine
    return {"status": "ok", "tokens": tokens}


def hf_rows(model, args) -> dict:
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        save_model(model, tmp, quantization="fp8")
        hf = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, device_map="cuda")
        log(f"transformers loaded the FP8 checkpoint in {time.perf_counter() - t:.0f} s "
            f"({type(hf.model.layers[0].self_attn.o_proj).__name__})")
    rows = {"version": transformers.__version__, "o_proj": type(hf.model.layers[0].self_attn.o_proj).__name__,
            "decode": guarded("hf decode 1", lambda: hf_decode(hf, 1, args.context, 2, 8)),
            "prefill": guarded("hf prefill", lambda: hf_prefill(hf, 1, 2048, 2, 1))}
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--sections", default="kernels,engine")
    ap.add_argument("--hf", action="store_true", help="add transformers' FP8 rows (same as --sections ...,hf)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prefill", default="1x2048,8x512")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/fp8_engine_h200.json")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    args.hf = args.hf or "hf" in sections
    args.batches = [int(b) for b in args.batches.split(",")]
    args.prefill = [tuple(int(v) for v in p.split("x")) for p in args.prefill.split(",") if p]
    device = torch.device("cuda")
    config = preset(args.preset)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "preset": args.preset, "args": {k: str(v) for k, v in vars(args).items()}}
    res["bandwidth_gbs"] = copy_bandwidth(device, 2 * 2**30) / 1e9
    res["peaks"] = peaks(device)
    log(f"copy bandwidth {res['bandwidth_gbs']:,.0f} GB/s; peaks bf16 {res['peaks']['bf16_flops'] / 1e12:,.0f}, "
        f"fp8 {res['peaks']['fp8_flops'] / 1e12:,.0f} TFLOP/s")
    bandwidth = res["bandwidth_gbs"] * 1e9
    if "kernels" in sections:
        res["kernels"] = kernels(config, device, bandwidth, res["peaks"])
        free_memory()
    if "tune" in sections:
        res["tune"] = tune(config, device)
        free_memory()
    if "tune-decode" in sections:
        res["tune_decode"] = tune_decode(config, device, bandwidth)
        free_memory()
    def save(engine: dict) -> None:  # after every row: a run cut short keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res | {"engine": engine, "complete": False}, indent=2, default=str))

    if "engine" in sections or args.hf:
        res["engine"] = engine_rows(config, device, bandwidth, res["peaks"], args, save)
        free_memory()
    print_tables(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res | {"complete": True}, indent=2, default=str))
    return res


def print_tables(res: dict) -> None:
    print(f"\n{res['device']}, copy {res['bandwidth_gbs']:,.0f} GB/s, peaks bf16 "
          f"{res['peaks']['bf16_flops'] / 1e12:,.0f} / fp8 {res['peaks']['fp8_flops'] / 1e12:,.0f} TFLOP/s")
    if "kernels" in res:
        print(f"\n{'kernel':<44}{'bf16 us':>9}{'fp8 us':>9}{'speedup':>9}{'limit bf16':>11}{'limit fp8':>10}")
        for r in res["kernels"]:
            print(f"{r['kernel']:<44}{r['bf16_us']:>9.1f}{r['fp8_us']:>9.1f}{r['speedup']:>8.2f}x"
                  f"{r.get('limit_bf16_us', float('nan')):>11.1f}{r.get('limit_fp8_us', float('nan')):>10.1f}")
    eng = res.get("engine")
    if not eng:
        return
    b, f = eng["bf16"], eng["fp8"]
    print(f"\n{'engine row':<22}{'bf16':>12}{'fp8':>12}{'fp8/bf16':>10}{'limit bf16':>12}{'limit fp8':>11}")

    def line(label, x, y, lx, ly, unit=""):
        ratio = y / x if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x else float("nan")
        fmt = lambda v: f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)  # noqa: E731
        print(f"{label:<22}{fmt(x):>12}{fmt(y):>12}{ratio:>9.2f}x{fmt(lx):>12}{fmt(ly):>11} {unit}")

    for rb, rf in zip(b["decode"], f["decode"]):
        line(f"decode batch {rb['batch']}", rb["dsv2"].get("tok_s"), rf["dsv2"].get("tok_s"),
             rb["limit"]["tok_s"], rf["limit"]["tok_s"], "tok/s")
    for rb, rf in zip(b["prefill"], f["prefill"]):
        line(f"prefill {rb['row']}", rb["dsv2"].get("tok_s"), rf["dsv2"].get("tok_s"),
             rb["limit"]["tok_s"], rf["limit"]["tok_s"], "tok/s")
    line("weights (MiB)", b["weight_bytes"]["total"] / 2**20, f["weight_bytes"]["total"] / 2**20, None, None)
    line("cache tokens at 0.9", b["cache_tokens"].get("tokens"), f["cache_tokens"].get("tokens"), None, None)
    hf = eng.get("transformers_fp8")
    if hf and hf.get("status", "ok") == "ok":
        print(f"\ntransformers {hf['version']} FP8 ({hf['o_proj']}): decode batch 1 "
              f"{hf['decode'].get('tok_s', float('nan')):,.1f} tok/s, prefill 1x2048 "
              f"{hf['prefill'].get('tok_s', float('nan')):,.0f} tok/s")
    elif hf:
        print(f"\ntransformers FP8: {hf}")


if __name__ == "__main__":
    main()

"""Inference-engine throughput at the DeepSeek-V2-Lite shape (random bf16 weights, no checkpoint):
dsv2's engine against transformers' DeepseekV2ForCausalLM, beside the physical limit measured in
the same run.

    python bench/engine_bench.py                                  # decode + prefill, H100, ~3-5 min
    python bench/engine_bench.py --sections maxtp --out bench/results/engine_bench_maxtp_h100.json
    python bench/engine_bench.py --sections longctx --out bench/results/engine_bench_longctx_h200.json
    python bench/engine_bench.py --preset dsv2-tiny --device cpu --quick   # smoke run, seconds
    python bench/engine_bench.py --plot-only bench/results/engine_bench_h100.json

Sections (--sections, default decode,prefill; --max-throughput adds maxtp):

- decode: B requests of a random `--context`-token prompt each; the engine steps until every
  request has its first token (the prefills), then `--warmup-steps` decode steps (CUDA graphs, if
  the engine captures them, are captured there), then `--decode-steps` timed steps, each a full
  `engine.step()` producing B tokens. transformers: one prefill forward of the [B, context] batch
  with its cache, then the same number of single-token greedy steps on past_key_values.
- prefill: N x S random prompts with max_tokens=1, from add_request until every request has its
  token, best and median of `--prefill-reps` repeats (prefix caching off, so each repeat computes).
  transformers: one forward over the [N, S] batch with use_cache=True.
- longctx: long contexts (defaults 8K / 32K / 128K, `--lc-*`): one prompt through chunked prefill
  (`--batched-tokens` a step) to its first token, with its throughput, MFU and the memory it takes
  at its peak above the model and cache; decode at batch 1 and 8 with 32K and 128K contexts beside
  the step's limit and the cache's share of it (its bytes at the copy bandwidth, what the MLA
  kernel's split must reach); a 32K document asked twice, the second time from the prefix cache.
- maxtp: the paper's generation-throughput comparison in miniature. Each model (V2-Lite and a dense
  MHA 7B of DeepSeek LLM 7B's shape) gets the engine with its cache sized from free memory
  (gpu_memory_utilization 0.9); the batch is as many prompt+gen sequences as that cache holds (at
  most --max-batch); the whole run goes twice and the second is timed (the first compiles and
  captures the step shapes the run meets, as a server's warm-up would), its decode and its total.

The limits. Decode moves bytes: every weight a step reads (attention, dense MLPs, shared experts,
gate, norms, lm_head; the routed experts the batch touches, expected E(1 - (1 - k/E)^B) per MoE
layer if the B tokens route uniformly; embedding rows) plus the whole latent cache of the batch,
over the device-to-device copy bandwidth (read + write bytes of a 2 GiB copy, best of 5).
Prefill computes: 2 x activated parameters per token (the lm_head only at each sequence's last
token) plus causal attention, over the dense bf16 peak; the limit is the larger of that time and
the weight-read time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._log import stamped, sync  # noqa: E402

from dsv2.checkpoint import random_model  # noqa: E402
from dsv2.config import ModelConfig, preset  # noqa: E402
from dsv2.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from dsv2.engine.cache import PagedLatentCache  # noqa: E402
from dsv2.engine.sequence import PENDING  # noqa: E402
from dsv2.engine.llm import KV_CACHE_DTYPES  # noqa: E402
from dsv2.info import count_params  # noqa: E402
from dsv2.model import Transformer  # noqa: E402
from dsv2.model.fp8_layers import quantize_model_  # noqa: E402

# Dense bf16 tensor-core peak, FLOP/s, from the SXM datasheets (the sparsity figures are 2x these).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
# The paper (Section 3.2.3): DeepSeek-V2's maximum generation throughput is 5.76x DeepSeek 67B's.
PAPER_MAX_THROUGHPUT_RATIO = 5.76
# transformers on an H100 measured earlier (same shapes, random bf16 weights), for orientation only.
HF_EARLIER_H100 = {"decode_tok_s": {1: 22, 16: 316, 64: 388},
                   "prefill_tok_s": {"1x2048": 27e3, "8x512": 44e3}}
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
log = stamped("engine_bench")



def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(label: str, fn) -> dict:
    """Run one row; an out-of-memory (or any other failure) becomes that row's record, not a crash."""
    try:
        out = fn()
    except OOM:
        log(f"{label}: out of memory")
        out = {"status": "OOM"}
    except Exception as e:  # noqa: BLE001 - a long GPU run keeps its other rows
        traceback.print_exc()
        out = {"status": "error", "error": f"{type(e).__name__}: {e}"[:800]}
    free_memory()  # outside the except block, so the traceback's frames (and tensors) are gone
    return out


# --- the physical limits ---------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write; best of `reps`."""
    x = torch.ones(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = math.inf
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    del x, y
    free_memory()
    return 2 * nbytes / best


def expected_experts(n_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts touched when each of `tokens` tokens picks top_k of n_experts, assuming
    uniform routing with picks independent across tokens (random weights route close to that)."""
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens)


def weight_bytes(model: Transformer) -> dict:
    """Parameter bytes by what a forward step must read, from the model's own parameters.

    every_step: read whatever the batch (attention, dense MLPs, shared experts, gates, norms,
    lm_head); per_expert: one routed expert of one MoE layer (gate + up + down); embedding: the
    table, of which a step reads only its tokens' rows (row_bytes each)."""
    config = model.config
    every, routed, embedding = 0, 0, 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        parts = name.split(".")
        if name.startswith("embed_tokens."):
            embedding += nbytes
        elif parts[0] == "layers" and parts[2:4] == ["mlp", "experts"] and config.is_moe_layer(int(parts[1])):
            routed += nbytes
        else:
            every += nbytes
    if config.tie_word_embeddings:  # the lm_head is the embedding, read whole every step
        every += embedding
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    per_expert = routed // (moe_layers * config.n_routed_experts) if moe_layers else 0
    elt = next(model.parameters()).element_size()
    return {"every_step": every, "routed_total": routed, "per_expert": per_expert, "moe_layers": moe_layers,
            "embedding": embedding, "row_bytes": config.hidden_size * elt,
            "total": every + routed + embedding}


def kv_bytes_per_token(config: ModelConfig, engine: LLMEngine | None = None, dtype=torch.bfloat16) -> float:
    """Cache bytes one token costs over all layers, e.g. (kv_lora_rank + rope) x layers x 2 for
    MLA in bf16: from the engine's live cache when given (as stored), else from the cache's rule."""
    pages = getattr(engine, "pages", None)
    if pages is not None and hasattr(pages, "nbytes"):
        return pages.nbytes / (pages.num_blocks * pages.block_size)
    return PagedLatentCache.bytes_per_block(config, 1, dtype)


def decode_limit(config: ModelConfig, wb: dict, batch: int, context: float, kv_per_token: float,
                 bandwidth: float, peak: float | None = None, matmul_peak: float | None = None) -> dict:
    """A decode step's limit: its bytes over the copy bandwidth, or, where that is shorter, its FLOPs
    over the dense peak (`matmul_peak` for the linear layers, FP8's where the weights are FP8; the
    absorbed attention over the latent cache at `peak`). Large batches cross from bytes to FLOPs."""
    experts = _experts(config, wb, batch)
    weights = wb["every_step"] + wb["moe_layers"] * experts * wb["per_expert"] + batch * wb["row_bytes"]
    kv = batch * context * kv_per_token
    seconds = (weights + kv) / bandwidth
    flops = decode_flops(config, batch, context)
    if peak:
        seconds = max(seconds, flops["linear"] / (matmul_peak or peak) + flops["attention"] / peak)
    return {"bytes": weights + kv, "weight_bytes": weights, "kv_bytes": kv,
            "experts_per_layer_expected": experts, "flops": flops["linear"] + flops["attention"],
            "kv_bytes_per_token": kv_per_token, "context_mean": context, "step_ms": seconds * 1e3,
            "tok_s": batch / seconds}


def decode_flops(config: ModelConfig, batch: int, context: float) -> dict:
    """One decode step's FLOPs: 2 x activated parameters per row (the embedding is a lookup) and,
    per layer and head, the absorbed attention's scores over kv_lora_rank + rope and its weighted
    sum over kv_lora_rank for every cached token."""
    linear = 2 * (count_params(config)["activated"] - config.vocab_size * config.hidden_size) * batch
    if config.kv_lora_rank:
        per_token = 2 * (2 * config.kv_lora_rank + config.qk_rope_head_dim)
    else:  # MHA: q.k over the head dim, p.v over v_head_dim
        per_token = 2 * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    attention = per_token * config.num_attention_heads * config.num_hidden_layers * context * batch
    return {"linear": linear, "attention": attention}


def _experts(config: ModelConfig, wb: dict, tokens: int) -> float:
    if not wb["moe_layers"]:
        return 0.0
    return expected_experts(config.n_routed_experts, config.num_experts_per_tok, tokens)


def prefill_limit(config: ModelConfig, wb: dict, n: int, s: int, bandwidth: float,
                  peak: float | None) -> dict:
    """FLOPs: 2 x activated params per token, the lm_head only at each sequence's last token (the
    one whose logits are needed), plus causal attention in the expanded form: per layer and head,
    q.k over qk_head_dim and p.v over v_head_dim for S(S+1)/2 query-key pairs, 2 FLOPs each."""
    tokens = n * s
    lm_head = config.vocab_size * config.hidden_size
    body = count_params(config)["activated"] - lm_head
    attn = (2 * config.num_hidden_layers * config.num_attention_heads
            * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * n * s * (s + 1) / 2)
    flops = 2 * body * tokens + 2 * lm_head * n + attn
    weights = wb["every_step"] + wb["moe_layers"] * _experts(config, wb, tokens) * wb["per_expert"]
    t_bytes = weights / bandwidth
    t_flops = flops / peak if peak else 0.0
    seconds = max(t_bytes, t_flops)
    return {"flops": flops, "attention_flops": attn, "weight_bytes": weights, "compute_s": t_flops,
            "bytes_s": t_bytes, "bound": "compute" if t_flops >= t_bytes else "bandwidth",
            "ms": seconds * 1e3, "tok_s": tokens / seconds, "peak_flops": peak}


# --- dsv2 ------------------------------------------------------------------------------------------
def engine_config(**kw) -> EngineConfig:
    """EngineConfig from the fields it has (it is being extended concurrently: unknown keys from
    --engine-opt are reported, not fatal)."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(kw) - names)
    if unknown:
        log(f"EngineConfig has no field(s) {unknown}; ignored")
    return EngineConfig(**{k: v for k, v in kw.items() if k in names})


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def _run_to_first_tokens(engine: LLMEngine, ids: set[str]) -> int:
    """Step until each of `ids` has produced a token; return the steps taken. Read off the
    sequences, not the outputs: a request with output_kind "final_only" has none until it ends."""
    seqs = [engine.requests[rid][0] for rid in ids]
    steps = 0
    while not all(s.finished or (s.output_token_ids and s.output_token_ids[0] != PENDING) for s in seqs):
        engine.step()
        steps += 1
    return steps


def kernel_table(events, steps: int) -> dict:
    """The profiled steps' GPU kernels grouped by name (template arguments dropped), per step."""
    groups: dict[str, list[float]] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")):
            name = e.name.split("<", 1)[0].split("(", 1)[0].strip()[:90]
            groups.setdefault(name, []).append(e.device_time_total)
    rows = sorted(({"kernel": k, "per_step": len(v) / steps, "us_per_step": sum(v) / steps}
                   for k, v in groups.items()), key=lambda r: -r["us_per_step"])
    return {"busy_us_per_step": sum(r["us_per_step"] for r in rows),
            "kernels_per_step": sum(r["per_step"] for r in rows), "kernels": rows}


def profile_steps(engine: LLMEngine, steps: int, run=None) -> dict:
    """Profile `steps` engine steps (or what `run` does, counted as `steps`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        if run is not None:
            run()
        for _ in range(0 if run is not None else steps):
            engine.step()
        torch.cuda.synchronize()
    table = kernel_table(prof.events(), steps)
    log(f"  profile: {table['kernels_per_step']:.0f} kernels, {table['busy_us_per_step']:.0f} us busy per step")
    for r in table["kernels"][:25]:
        log(f"    {r['kernel']:<90} {r['per_step']:6.1f}/step {r['us_per_step']:8.1f} us")
    return table


def dsv2_decode(model: Transformer, batch: int, prompt: int, warmup: int, steps: int, batched_tokens: int,
                block_size: int, opts: dict, profile: int = 0) -> dict:
    device = next(model.parameters()).device
    # nobody finishes inside the timed window: the first-admitted rows decode while later ones
    # still prefill, one step per max_num_batched_tokens of prompt
    max_tokens = 2 + warmup + steps + profile + math.ceil(batch * prompt / max(batched_tokens, batch))
    total = prompt + max_tokens
    engine = LLMEngine(model, None, engine_config(
        max_num_seqs=batch, max_num_batched_tokens=max(batched_tokens, batch), block_size=block_size,
        num_blocks=batch * math.ceil(total / block_size) + 1, max_model_len=total,
        enable_prefix_caching=False, **opts))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid, p in zip(ids, _prompts(batch, prompt, model.config.vocab_size, seed=batch), strict=True):
        engine.add_request(rid, p, params)
    sync(device)
    t = time.perf_counter()
    prefill_steps = _run_to_first_tokens(engine, set(ids))
    sync(device)
    prefill_s = time.perf_counter() - t
    for _ in range(warmup):
        engine.step()
    sync(device)
    produced = []
    t = time.perf_counter()
    for _ in range(steps):
        produced.append(len(engine.step()))  # requests advanced this step; one token each (n = 1)
    sync(device)
    seconds = time.perf_counter() - t
    tokens = sum(produced)
    out = {"status": "ok", "batch": batch, "prompt": prompt, "steps": steps, "warmup_steps": warmup,
           "seconds": seconds, "tok_s": tokens / seconds, "ms_per_step": seconds / steps * 1e3,
           "tokens": tokens, "every_step_full": all(n == batch for n in produced),
           "prefill_steps": prefill_steps, "prefill_s": prefill_s,
           "preemptions": engine.scheduler.num_preemptions,
           "kv_bytes_per_token": kv_bytes_per_token(model.config, engine),
           "decode_kernel": bool(getattr(engine.runner, "use_kernel", False))}
    if not out["every_step_full"]:
        log(f"  warning: not every timed step produced {batch} tokens: {produced}")
    if profile and device.type == "cuda":
        out["profile"] = profile_steps(engine, profile)
    del engine
    return out


def dsv2_prefill(model: Transformer, n: int, s: int, reps: int, warmup: int, batched_tokens: int,
                 block_size: int, opts: dict, profile: bool = False) -> dict:
    device = next(model.parameters()).device
    engine = LLMEngine(model, None, engine_config(
        max_num_seqs=n, max_num_batched_tokens=max(batched_tokens, n * s), block_size=block_size,
        num_blocks=n * math.ceil((s + 1) / block_size) + 1, max_model_len=s + 1,
        enable_prefix_caching=False, **opts))
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    times, steps = [], []

    def rep(r: int) -> int:
        ids = [f"p{n}x{s}-{r}-{i}" for i in range(n)]
        for rid, p in zip(ids, _prompts(n, s, model.config.vocab_size, seed=1000 + r), strict=True):
            engine.add_request(rid, p, params)
        k = _run_to_first_tokens(engine, set(ids))
        while engine.has_unfinished_requests():  # max_tokens=1: all finished already
            engine.step()
        return k

    for r in range(warmup + reps):
        sync(device)
        t = time.perf_counter()
        k = rep(r)
        sync(device)
        if r >= warmup:
            times.append(time.perf_counter() - t)
            steps.append(k)
    # one step runs the prefill; with async scheduling one more reads its tokens back
    expected = 1 + engine.cfg.async_scheduling
    table = profile_steps(engine, 1, lambda: rep(warmup + reps)) if profile and device.type == "cuda" else None
    del engine
    if any(k != expected for k in steps):
        log(f"  note: the prefill took {steps} engine steps per repeat (token budget {batched_tokens})")
    best, median = min(times), statistics.median(times)
    return {"status": "ok", "n": n, "s": s, "reps": reps, "seconds": times, "best_ms": best * 1e3,
            "median_ms": median * 1e3, "tok_s": n * s / best, "tok_s_median": n * s / median, "steps": steps,
            **({"profile": table} if table else {})}


def experts_touched(model: Transformer, batch: int) -> float:
    """Mean distinct routed experts per MoE layer for `batch` random tokens (one decode step's
    worth) through the model itself: the uniform-routing assumption checked on these weights."""
    if not model.config.n_routed_experts:
        return 0.0
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g).to(device)
    with torch.inference_mode():
        routes = model(tokens, return_router=True).router
    counts = [r.topk_idx.unique().numel() for r in routes]
    return sum(counts) / len(counts)


# --- transformers ----------------------------------------------------------------------------------
def build_hf(config: ModelConfig, device: torch.device, dtype: torch.dtype):
    """transformers' model of the same shape (DeepseekV2ForCausalLM; LlamaForCausalLM for an MHA
    preset, as config.json names it), random weights initialized on the device itself.
    transformers 5 takes the MoE kernel as `experts_implementation=` of from_config/_from_config
    (or from_pretrained); it lands on config._experts_implementation."""
    import transformers

    d = dict(config.to_hf())
    d.pop("torch_dtype", None)
    cls = getattr(transformers, d.pop("architectures")[0])
    hf_config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    kwargs = {"attn_implementation": "sdpa", "dtype": dtype}
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = cls._from_config(hf_config, experts_implementation="grouped_mm", **kwargs)
        except (TypeError, ValueError) as e:  # no grouped_mm experts in this transformers (or model)
            log(f"transformers: experts_implementation='grouped_mm' refused ({e}); default experts")
            model = cls._from_config(hf_config, **kwargs)
    if next(model.parameters()).device != device:
        model = model.to(device)
    return model.eval(), {"version": transformers.__version__,
                          "experts_implementation": getattr(model.config, "_experts_implementation", None),
                          "attn_implementation": getattr(model.config, "_attn_implementation", None)}


@torch.inference_mode()
def hf_decode(model, batch: int, prompt: int, warmup: int, steps: int) -> dict:
    device = next(model.parameters()).device
    ids = torch.tensor(_prompts(batch, prompt, model.config.vocab_size, seed=batch), device=device)
    sync(device)
    t = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    prefill_s = time.perf_counter() - t
    del out
    for _ in range(warmup):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    seconds = time.perf_counter() - t
    return {"status": "ok", "batch": batch, "prompt": prompt, "steps": steps, "seconds": seconds,
            "tok_s": batch * steps / seconds, "ms_per_step": seconds / steps * 1e3, "prefill_s": prefill_s}


@torch.inference_mode()
def hf_prefill(model, n: int, s: int, reps: int, warmup: int) -> dict:
    device = next(model.parameters()).device
    times = []
    for r in range(warmup + reps):
        ids = torch.tensor(_prompts(n, s, model.config.vocab_size, seed=1000 + r), device=device)
        sync(device)
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1)
        sync(device)
        if r >= warmup:
            times.append(time.perf_counter() - t)
        del out
    best, median = min(times), statistics.median(times)
    return {"status": "ok", "n": n, "s": s, "reps": reps, "seconds": times, "best_ms": best * 1e3,
            "median_ms": median * 1e3, "tok_s": n * s / best, "tok_s_median": n * s / median}


# --- long contexts ---------------------------------------------------------------------------------
def _peak_reset(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_above(device: torch.device, base: int) -> int | None:
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None


def long_prefill(model: Transformer, s: int, chunk: int, block_size: int, opts: dict, reps: int = 1) -> dict:
    """One s-token prompt through chunked prefill (chunk tokens a step) to its first token, after one
    untimed run of the same length (compilation, captures); the memory above the model and its
    cache that the prefill takes at its peak (activations, logits), which must not grow with s."""
    device = next(model.parameters()).device
    engine = LLMEngine(model, None, engine_config(
        max_num_seqs=1, max_num_batched_tokens=chunk, block_size=block_size,
        num_blocks=math.ceil((s + 1) / block_size) + 1, max_model_len=s + 1, enable_prefix_caching=False, **opts))
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    times, peak = [], None
    for r in range(1 + reps):
        engine.add_request(f"long{s}-{r}", _prompts(1, s, model.config.vocab_size, seed=77 + r)[0], params)
        base = _peak_reset(device)
        t = time.perf_counter()
        steps = _run_to_first_tokens(engine, {f"long{s}-{r}"})
        sync(device)
        if r:
            times.append(time.perf_counter() - t)
            peak = _peak_above(device, base)
        while engine.has_unfinished_requests():
            engine.step()
    del engine
    best = min(times)
    return {"status": "ok", "s": s, "chunk": chunk, "steps": steps, "seconds": times, "best_s": best,
            "tok_s": s / best, "activation_peak_bytes": peak}


def prefix_hit(model: Transformer, s: int, chunk: int, block_size: int, opts: dict) -> dict:
    """Two requests on one s-token document with different last tokens: the second's time to first
    token, its document read from the prefix cache, against the first's."""
    device = next(model.parameters()).device
    engine = LLMEngine(model, None, engine_config(
        max_num_seqs=2, max_num_batched_tokens=chunk, block_size=block_size,
        num_blocks=2 * math.ceil((s + 2) / block_size) + 2, max_model_len=s + 2, enable_prefix_caching=True,
        **opts))
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    doc = _prompts(1, s, model.config.vocab_size, seed=99)[0]
    ttft = {}
    for name, last in (("first", 5), ("second", 6), ("warm_first", 7)):
        if name == "warm_first":  # a fresh document of the same length: the first request's time, compiled
            doc = _prompts(1, s, model.config.vocab_size, seed=98)[0]
        engine.add_request(name, doc + [last], params)
        seq = engine.requests[name][0]
        sync(device)
        t = time.perf_counter()
        _run_to_first_tokens(engine, {name})
        sync(device)
        ttft[name] = time.perf_counter() - t
        cached = seq.num_cached_tokens
        while engine.has_unfinished_requests():
            engine.step()
        if name == "second":
            ttft["second_cached_tokens"] = cached
    del engine
    return {"status": "ok", "s": s, "ttft_first_s": ttft["warm_first"], "ttft_second_s": ttft["second"],
            "second_cached_tokens": ttft["second_cached_tokens"], "speedup": ttft["warm_first"] / ttft["second"]}


def run_longctx(model, config: ModelConfig, wb: dict, args, bandwidth: float, peak: float | None, opts: dict,
                hf=None) -> dict:
    chunk = args.batched_tokens
    out = {"prefill": [], "decode": [], "prefix": None, "chunk": chunk}
    for s in (int(x) for x in args.lc_prefill.split(",") if x):
        log(f"long prefill: {s} tokens in chunks of {chunk}")
        r = guarded(f"long prefill {s}", lambda s=s: long_prefill(model, s, chunk, args.block_size, opts))
        row = {"s": s, "dsv2": r, "limit": prefill_limit(config, wb, 1, s, bandwidth, peak)}
        if r.get("status") == "ok" and peak:
            row["mfu"] = row["limit"]["flops"] / r["best_s"] / peak
        out["prefill"].append(row)
        free_memory()
        log(f"  {_rate(r)}")
    for spec in (x for x in args.lc_decode.split(",") if x):
        b, ctx = (int(v) for v in spec.split("x"))
        log(f"long decode: batch {b} at {ctx} tokens")
        r = guarded(f"long decode {spec}", lambda b=b, ctx=ctx: dsv2_decode(
            model, b, ctx, args.warmup_steps, args.decode_steps, chunk, args.block_size, opts))
        context = ctx + args.warmup_steps + (args.decode_steps + 1) / 2
        kv = r.get("kv_bytes_per_token") or kv_bytes_per_token(config, None)
        limit = decode_limit(config, wb, b, context, kv, bandwidth, peak)
        # the latent cache's share of the step: what the MLA kernel's split must read at bandwidth
        limit["kv_ms"] = limit["kv_bytes"] / bandwidth * 1e3
        out["decode"].append({"batch": b, "context": ctx, "dsv2": r, "limit": limit})
        free_memory()
        log(f"  {_rate(r)}, {_fmt(r.get('ms_per_step'), '.2f')} ms/step (cache alone at bandwidth "
            f"{limit['kv_ms']:.2f} ms)")
    if args.lc_prefix:
        log(f"prefix cache: a {args.lc_prefix}-token document, asked twice")
        out["prefix"] = guarded("prefix", lambda: prefix_hit(model, args.lc_prefix, chunk, args.block_size, opts))
    return out


# --- maximum generation throughput -----------------------------------------------------------------
def model_spec(spec: str) -> tuple[str, bool, str | None]:
    """'PRESET[+fp8][+kv=DTYPE]' -> (preset, FP8 weights, cache dtype): the paper's deployment setting
    is 'deepseek-v2-lite+fp8+kv=6bit'."""
    name, *opts = spec.split("+")
    fp8_weights, kv = False, None
    for o in opts:
        if o == "fp8":
            fp8_weights = True
        elif o.startswith("kv=") and o[3:] in KV_CACHE_DTYPES:
            kv = o[3:]
        else:
            raise ValueError(f"{spec}: unknown option {o!r} (fp8, kv={'|'.join(KV_CACHE_DTYPES)})")
    return name, fp8_weights, kv


def max_throughput_row(spec: str, device: torch.device, dtype: torch.dtype, args, bandwidth: float,
                       opts: dict, peak: float | None) -> dict:
    name, fp8_weights, kv = model_spec(spec)
    config = preset(name)
    model = random_model(config, device, dtype)
    if fp8_weights:
        quantize_model_(model)
    cache_dtype = KV_CACHE_DTYPES[kv] if kv else None
    wb = weight_bytes(model)
    total = args.mt_prompt + args.mt_gen
    ecfg = dict(max_num_seqs=args.max_batch, max_num_batched_tokens=args.mt_batched_tokens,
                block_size=args.block_size, max_model_len=total, enable_prefix_caching=False, **opts)
    num_blocks = None  # the engine sizes its cache from free memory (gpu_memory_utilization)
    if args.mt_cache_mib:  # a fixed budget instead (smoke runs: the CPU default is 4 GiB)
        probe = LLMEngine(model, None, engine_config(**ecfg, num_blocks=math.ceil(total / args.block_size)),
                          cache_dtype)
        per_block = probe.pages.nbytes / probe.pages.num_blocks
        del probe
        num_blocks = max(1, int(args.mt_cache_mib * 2**20 // per_block))
    engine = LLMEngine(model, None, engine_config(**ecfg, num_blocks=num_blocks,
                                                  gpu_memory_utilization=args.mt_memory), cache_dtype)
    num_blocks = engine.blocks.num_blocks
    fits = num_blocks // math.ceil(total / args.block_size)
    batch = min(fits, args.max_batch)
    out = {"status": "ok", "params": sum(p.numel() for p in model.parameters()), "weight_bytes": wb["total"],
           "num_blocks": num_blocks, "cache_tokens": num_blocks * args.block_size,
           "cache_bytes": getattr(engine.pages, "nbytes", None),
           "kv_bytes_per_token": kv_bytes_per_token(config, engine),
           "sequences_fit": fits, "batch": batch, "prompt": args.mt_prompt, "gen": args.mt_gen,
           "weights": "fp8" if fp8_weights else str(dtype).removeprefix("torch."), "kv_cache_dtype": kv or "auto"}
    log(f"  cache {num_blocks} blocks = {out['cache_tokens']} tokens "
        f"({out['kv_bytes_per_token']:.0f} B/token): {fits} sequences of {total} fit, running {batch}")
    # the same run twice, timing the second: the first compiles and captures every step shape the
    # run meets (prefill chunks, each decode batch size as sequences finish), as a warmed-up server would
    for run in range(2):
        warmup, steps = _max_throughput_pass(engine, batch, config, args, device, run, out)
    context = args.mt_prompt + warmup + (steps + 1) / 2
    # the batch shrinks as sequences finish (the first admitted finish first): the limit is each
    # timed step's own, at the rows it ran
    rows = [r for r in out["decode_rows_per_step"] if r]
    matmul_peak = peak and peak * (2 if fp8_weights else 1)  # FP8 tensor cores: twice bf16's rate
    limit = functools.partial(decode_limit, config, wb, context=context, kv_per_token=out["kv_bytes_per_token"],
                              bandwidth=bandwidth, peak=peak, matmul_peak=matmul_peak)
    out["limit"] = limit(max(1, round(out["decode_rows_mean"])))
    step_ms = [limit(r)["step_ms"] for r in rows]
    if step_ms:
        out["limit"]["tok_s"] = sum(rows) / (sum(step_ms) / 1e3)
    del engine, model
    return out


def _max_throughput_pass(engine, batch: int, config: ModelConfig, args, device, run: int, out: dict):
    """`batch` sequences of prompt + gen tokens through `engine`: their prefills, then decode
    timed after `--warmup-steps` steps. Records the times in `out`; returns (warm-up steps, timed steps)."""
    params = SamplingParams(max_tokens=args.mt_gen, ignore_eos=True, temperature=0.0, output_kind="final_only")
    ids = [f"m{run}-{i}" for i in range(batch)]
    for rid, p in zip(ids, _prompts(batch, args.mt_prompt, config.vocab_size, seed=5 + run), strict=True):
        engine.add_request(rid, p, params)
    # the sequences themselves count the tokens (finished requests leave engine.requests)
    seqs = [s for rid in ids for s in engine.requests[rid]]

    def generated() -> int:  # tokens sampled so far, the ones still in flight included
        return sum(len(s.output_token_ids) for s in seqs)

    engine.scheduler.num_preemptions = 0
    sync(device)
    t0 = time.perf_counter()
    out["prefill_steps"] = _run_to_first_tokens(engine, set(ids))
    sync(device)
    t1 = time.perf_counter()
    out["tokens_during_prefill"] = generated()
    warmup = min(args.warmup_steps, max(args.mt_gen - 2, 0))
    for _ in range(warmup):
        engine.step()
    sync(device)
    t2 = time.perf_counter()
    before, steps, rows = generated(), 0, []
    while engine.has_unfinished_requests():
        rows.append(len(engine.scheduler.running))  # the rows this step decodes
        engine.step()
        steps += 1
    sync(device)
    t3 = time.perf_counter()
    tokens = generated() - before
    out.update(prefill_s=t1 - t0, decode_steps=steps, decode_s=t3 - t2, decode_tokens=tokens,
               decode_tok_s=tokens / (t3 - t2) if steps else float("nan"),
               ms_per_step=(t3 - t2) / steps * 1e3 if steps else float("nan"),
               decode_rows_per_step=rows, decode_rows_mean=tokens / steps if steps else float("nan"),
               generation_tok_s=generated() / (t3 - t0), preemptions=engine.scheduler.num_preemptions)
    if run == 0:
        out["first_run_s"] = t3 - t0
    return warmup, steps


def run_max_throughput(args, device, dtype, bandwidth, opts, peak, on_row=None) -> dict:
    """Each model of --mt-models; every one but the last against the last (the dense baseline).
    `on_row(rows)` after each model, so that a run cut short keeps what it measured."""
    rows = {}
    specs = args.mt_models.split(",")
    for spec in specs:
        try:
            model_spec(spec)
            preset(model_spec(spec)[0])
        except (KeyError, ValueError) as e:
            msg = f"{spec}: not available ({type(e).__name__}: {e}); skipped"
            log(msg)
            rows[spec] = {"status": "skipped", "reason": msg}
            continue
        log(f"max throughput: {spec}")
        rows[spec] = guarded(spec, lambda s=spec: max_throughput_row(s, device, dtype, args, bandwidth, opts, peak))
        free_memory()
        if on_row is not None:
            on_row(rows)
    base = rows[specs[-1]]
    ratios = {}
    for spec in specs[:-1]:
        if rows[spec].get("status") == base.get("status") == "ok":
            ratios[spec] = {"decode": rows[spec]["decode_tok_s"] / base["decode_tok_s"],
                            "generation": rows[spec]["generation_tok_s"] / base["generation_tok_s"]}
    first = ratios.get(specs[0], {})
    return {"models": rows, "baseline": specs[-1], "ratios": ratios, "ratio_of": [specs[0], specs[-1]],
            "ratio_decode": first.get("decode"), "ratio_generation": first.get("generation"),
            "paper_ratio": PAPER_MAX_THROUGHPUT_RATIO, "prompt": args.mt_prompt, "gen": args.mt_gen,
            "gpu_memory_utilization": args.mt_memory, "cache_mib": args.mt_cache_mib,
            "max_batch": args.max_batch}


# --- output ----------------------------------------------------------------------------------------
def _fmt(x, spec: str = ",.0f", width: int = 0) -> str:
    s = "—" if x is None else (x if isinstance(x, str) else format(x, spec))
    return f"{s:>{width}}" if width else s


def _rate(r: dict, key: str = "tok_s") -> str:
    v = _status(r, key)
    return f"{v:,.1f} tok/s" if isinstance(v, float) else str(v)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _status(r: dict | None, key: str = "tok_s"):
    if r is None:
        return None
    return r[key] if r.get("status") == "ok" else r.get("status", "?")


def print_tables(res: dict) -> None:
    print(f"\n{res['preset']} ({_count(res['params_total'])} total, {_count(res['params_activated'])} "
          f"activated), {res['dtype']} random weights, on {res['device']} (torch {res['torch']}, "
          f"transformers {res['transformers'] or '—'}); copy bandwidth {res['bandwidth_gbs']:,.0f} GB/s")
    if res.get("decode"):
        d0 = res["decode"][0]
        print(f"\ndecode: prompt {d0['context']} tokens, {res['args']['decode_steps']} timed engine steps "
              f"after {res['args']['warmup_steps']} warm-up; limit = step bytes / copy bandwidth")
        head = (f"{'row':<12}{'dsv2 tok/s':>12}{'ms/step':>9}{'transformers tok/s':>20}{'ratio':>8}"
                f"{'roofline tok/s':>16}{'% roofline':>12}{'experts/layer':>15}")
        print(head)
        for r in res["decode"]:
            ours, hf = _status(r["dsv2"]), _status(r.get("transformers"))
            ms = r["dsv2"].get("ms_per_step")
            ratio = ours / hf if isinstance(ours, float) and isinstance(hf, float) else None
            pct = ours / r["limit"]["tok_s"] * 100 if isinstance(ours, float) else None
            expected = r["limit"]["experts_per_layer_expected"]
            experts = f"{expected:.1f}/{_fmt(r.get('experts_measured'), '.1f')}"
            print(f"{'batch ' + str(r['batch']):<12}{_fmt(ours, ',.0f', 12)}{_fmt(ms, '.1f', 9)}"
                  f"{_fmt(hf, ',.0f', 20)}{_fmt(ratio, '.2f', 8)}{_fmt(r['limit']['tok_s'], ',.0f', 16)}"
                  f"{_fmt(pct, '.1f', 11)}{'%' if pct is not None else ' '}{experts:>15}")
        print("experts/layer: expected under uniform routing / measured on random tokens through the model")
    if res.get("prefill"):
        peak = res["peak_flops"]
        print(f"\nprefill: add_request to first token, best of {res['args']['prefill_reps']}; "
              f"limit = max(FLOPs / {_fmt(peak and peak / 1e12, ',.0f')} TFLOP/s dense bf16 peak, "
              "weight bytes / bandwidth)")
        print(f"{'row':<12}{'dsv2 tok/s':>12}{'ms':>9}{'transformers tok/s':>20}{'ratio':>8}"
              f"{'limit tok/s':>16}{'% limit':>12}{'MFU':>8}")
        for r in res["prefill"]:
            ours, hf = _status(r["dsv2"]), _status(r.get("transformers"))
            ms = r["dsv2"].get("best_ms")
            ratio = ours / hf if isinstance(ours, float) and isinstance(hf, float) else None
            pct = ours / r["limit"]["tok_s"] * 100 if isinstance(ours, float) else None
            mfu = r["limit"]["flops"] / (ms / 1e3) / peak * 100 if isinstance(ours, float) and peak else None
            print(f"{r['row']:<12}{_fmt(ours, ',.0f', 12)}{_fmt(ms, '.1f', 9)}{_fmt(hf, ',.0f', 20)}"
                  f"{_fmt(ratio, '.2f', 8)}{_fmt(r['limit']['tok_s'], ',.0f', 16)}{_fmt(pct, '.1f', 11)}"
                  f"{'%' if pct is not None else ' '}{_fmt(mfu, '.1f', 7)}{'%' if mfu is not None else ''}")
    lc = res.get("longctx")
    if lc:
        print(f"\nlong contexts: one prompt in chunks of {lc['chunk']} tokens to its first token; decode at long "
              "contexts; limits as above (the cache's share: its bytes at the copy bandwidth)")
        print(f"{'prefill':<14}{'tok/s':>10}{'s':>8}{'MFU':>8}{'peak above model+cache':>24}")
        for r in lc["prefill"]:
            d = r["dsv2"]
            act = d.get("activation_peak_bytes")
            print(f"{r['s']:<14,}{_fmt(_status(d), ',.0f', 10)}{_fmt(d.get('best_s'), '.2f', 8)}"
                  f"{_fmt(r.get('mfu') and 100 * r['mfu'], '.1f', 7)}%{_fmt(act and act / 2**30, '.2f', 20)} GiB")
        print(f"{'decode':<14}{'tok/s':>10}{'ms/step':>9}{'limit ms':>10}{'cache ms':>10}{'% limit':>9}")
        for r in lc["decode"]:
            d, lim = r["dsv2"], r["limit"]
            ms = d.get("ms_per_step")
            pct = lim["step_ms"] / ms * 100 if isinstance(ms, float) else None
            print(f"{str(r['batch']) + ' x ' + format(r['context'], ','):<14}{_fmt(_status(d), ',.0f', 10)}"
                  f"{_fmt(ms, '.2f', 9)}{lim['step_ms']:>10.2f}{lim['kv_ms']:>10.2f}{_fmt(pct, '.1f', 8)}%")
        p = lc.get("prefix")
        if p and p.get("status") == "ok":
            print(f"prefix cache, a {p['s']:,}-token document: time to first token {p['ttft_first_s']:.3f} s, asked "
                  f"again {p['ttft_second_s']:.3f} s ({p['speedup']:.1f}x; {p['second_cached_tokens']:,} tokens cached)")
    mt = res.get("max_throughput")
    if mt:
        cache = (f"a fixed {mt['cache_mib']} MiB cache" if mt.get("cache_mib") else
                 f"cache from gpu_memory_utilization {mt['gpu_memory_utilization']}")
        print(f"\nmaximum generation throughput: prompt {mt['prompt']} + {mt['gen']} generated tokens per "
              f"sequence, {cache}, batch = sequences that fit, at most {mt['max_batch']}")
        print(f"{'model':<30}{'KV B/token':>11}{'cache tokens':>14}{'fit':>7}{'batch':>7}{'rows/step':>10}"
              f"{'decode tok/s':>14}{'ms/step':>9}{'with prefill':>14}{'roofline':>16}{'% roofline':>12}")
        for name, r in mt["models"].items():
            if r.get("status") != "ok":
                print(f"{name:<30}{r.get('status')}: {r.get('reason') or r.get('error', '')}")
                continue
            pct = r["decode_tok_s"] / r["limit"]["tok_s"] * 100
            print(f"{name:<30}{r['kv_bytes_per_token']:>11,.0f}{r['cache_tokens']:>14,}{r['sequences_fit']:>7}"
                  f"{r['batch']:>7}{r['decode_rows_mean']:>10,.0f}"
                  f"{r['decode_tok_s']:>14,.0f}{r['ms_per_step']:>9.1f}{r['generation_tok_s']:>14,.0f}"
                  f"{r['limit']['tok_s']:>16,.0f}{pct:>11.1f}%")
        ratios = mt.get("ratios") or ({mt["ratio_of"][0]: {"decode": mt["ratio_decode"],
                                                          "generation": mt["ratio_generation"]}}
                                      if mt.get("ratio_decode") else {})
        for spec, r in ratios.items():
            print(f"{spec} / {mt.get('baseline', mt['ratio_of'][-1])}: decode {r['decode']:.2f}x, with prefill "
                  f"{r['generation']:.2f}x (paper, DeepSeek-V2 / DeepSeek 67B: {mt['paper_ratio']}x)")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res.get("decode") or []
    if not rows:
        log("no decode rows to plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("dsv2 engine", lambda r: _status(r["dsv2"]), "o-"),
              ("transformers", lambda r: _status(r.get("transformers")), "s-"),
              ("roofline (bytes / copy bandwidth)", lambda r: r["limit"]["tok_s"], "k--")]
    for label, get, style in series:
        pts = [(r["batch"], get(r)) for r in rows if isinstance(get(r), (int, float))]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
    for r in rows:
        if _status(r.get("transformers")) == "OOM":
            ours = _status(r["dsv2"])
            y = ours if isinstance(ours, float) else r["limit"]["tok_s"]
            ax.annotate("transformers: out of memory", (r["batch"], y), textcoords="offset points",
                        xytext=(0, -28), fontsize=8, color="C1", ha="right")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([r["batch"] for r in rows], [str(r["batch"]) for r in rows])
    ax.set_xlabel("batch (sequences decoding together)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Decode throughput, {res['preset']} ({res['dtype']}), prompt {rows[0]['context']}\n"
                 f"{res['device']}, {res['date']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"plot: {path}")


# --- main ------------------------------------------------------------------------------------------
QUICK = dict(batches="1,4,8", context=32, decode_steps=4, warmup_steps=2, prefill="1x64,2x32", prefill_reps=2,
             prefill_warmup=1, batched_tokens=256, bandwidth_mib=16, mt_models="dsv2-tiny,dsv2-tiny-mha",
             mt_prompt=16, mt_gen=8, max_batch=32, mt_batched_tokens=256, mt_cache_mib=1,
             lc_prefill="256,600", lc_decode="1x300,2x300", lc_prefix=300)
FULL = dict(batches="1,16,64,256", context=1024, decode_steps=64, warmup_steps=8, prefill="1x2048,8x512",
            prefill_reps=5, prefill_warmup=2, batched_tokens=8192, bandwidth_mib=2048,
            mt_models="deepseek-v2-lite,deepseek-llm-7b", mt_prompt=512, mt_gen=512, max_batch=1024,
            mt_batched_tokens=8192, lc_prefill="8192,32768,131072", lc_decode="1x32768,8x32768,1x131072,8x131072",
            lc_prefix=32768)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="default deepseek-v2-lite (dsv2-tiny with --quick)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    ap.add_argument("--sections", default="decode,prefill", help="comma list of decode, prefill, longctx, maxtp")
    ap.add_argument("--max-throughput", action="store_true", help="add the maxtp section")
    ap.add_argument("--batches", default=None, help="decode batch sizes, comma separated")
    ap.add_argument("--context", type=int, default=None, help="decode prompt length (tokens)")
    ap.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per row")
    ap.add_argument("--warmup-steps", type=int, default=None, help="untimed decode steps before them")
    # only the last batch: in two H100 runs the batch after a profiled one did not finish its
    # compilation and capture within six minutes (the same batches run in minutes unprofiled)
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="decode: after the last batch's timed steps, profile this many (kernel table in the JSON)")
    ap.add_argument("--prefill", default=None, help="prefill rows NxS, comma separated")
    ap.add_argument("--prefill-reps", type=int, default=None)
    ap.add_argument("--profile-prefill", action="store_true",
                    help="after each prefill row's timed repeats, profile one more (kernel table in the JSON)")
    ap.add_argument("--prefill-warmup", type=int, default=None)
    ap.add_argument("--batched-tokens", type=int, default=None, help="engine max_num_batched_tokens")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--bandwidth-mib", type=int, default=None, help="size of the bandwidth copy")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers rows")
    ap.add_argument("--mt-models", default=None, help="maxtp: two presets, ratio first / second")
    ap.add_argument("--mt-prompt", type=int, default=None)
    ap.add_argument("--mt-gen", type=int, default=None)
    ap.add_argument("--mt-memory", type=float, default=0.9, help="maxtp gpu_memory_utilization")
    ap.add_argument("--mt-cache-mib", type=int, default=None,
                    help="maxtp: fixed cache budget instead of gpu_memory_utilization (smoke runs)")
    ap.add_argument("--mt-batched-tokens", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=None, help="maxtp batch cap")
    ap.add_argument("--lc-prefill", default=None, help="longctx: prompt lengths, comma separated")
    ap.add_argument("--lc-decode", default=None, help="longctx: decode rows BxCONTEXT, comma separated")
    ap.add_argument("--lc-prefix", type=int, default=None, help="longctx: the shared document's length")
    ap.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="extra EngineConfig field (python literal), e.g. enforce_eager=True")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/engine_bench_h100.json")
    ap.add_argument("--plot", type=Path, default=None, help="PNG (default docs/engine_throughput.png)")
    ap.add_argument("--plot-only", type=Path, default=None, metavar="JSON", help="redraw from a JSON")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.preset = args.preset or ("dsv2-tiny" if args.quick else "deepseek-v2-lite")
    # a smoke run must not overwrite the committed GPU results
    scratch = args.quick or args.device == "cpu"
    tmp, results = Path(tempfile.gettempdir()), ROOT / "bench/results"
    default_out = tmp / "engine_bench_quick.json" if scratch else results / "engine_bench_h100.json"
    default_plot = tmp / "engine_throughput_quick.png" if scratch else ROOT / "docs/engine_throughput.png"
    args.out, args.plot = args.out or default_out, args.plot or default_plot
    args.sections = [s for s in args.sections.split(",") if s] + (["maxtp"] if args.max_throughput else [])
    return args


def checkpoint(res: dict, decode_rows: list, prefill_rows: list, out: Path) -> None:
    """The rows so far, marked incomplete: a run stopped by a time limit keeps what it measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**res, "complete": False, "decode": decode_rows, "prefill": prefill_rows},
                              indent=2, default=str))


def _literal(v: str):
    import ast

    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        res = json.loads(args.plot_only.read_text())
        print_tables(res)
        plot(res, args.plot)
        return res
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    opts = {k: _literal(v) for k, v in (o.split("=", 1) for o in args.engine_opt)}
    config = preset(args.preset)
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if device.type == "cuda" else None
    params = count_params(config)
    res = {"device": name, "torch": torch.__version__, "transformers": hf_version,
           "date": time.strftime("%Y-%m-%d"),
           "preset": args.preset, "dtype": args.dtype, "params_total": params["total"],
           "params_activated": params["activated"], "config": config.to_hf(), "peak_flops": peak,
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "assumptions": {
               "experts": "decode: expected distinct experts E(1-(1-k/E)^B) per MoE layer, uniform routing",
               "kv": "decode: the batch's whole latent cache read once per step, at the mean context",
               "prefill_flops": "2 x activated params/token (lm_head at last tokens only) + causal attention",
               "peak": "dense bf16 tensor-core peak from the datasheet (989 TFLOP/s for H100/H200 SXM)"},
           "transformers_earlier_h100": HF_EARLIER_H100}

    log(f"bandwidth: copying {args.bandwidth_mib} MiB on {name}")
    bandwidth = copy_bandwidth(device, args.bandwidth_mib * 2**20)
    res["bandwidth_gbs"] = bandwidth / 1e9
    log(f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s")

    batches = [int(b) for b in args.batches.split(",") if b]
    prefills = [tuple(int(x) for x in p.split("x")) for p in args.prefill.split(",") if p]
    decode_rows, prefill_rows = [], []
    if {"decode", "prefill", "longctx"} & set(args.sections):
        log(f"building dsv2 {args.preset} on {device} ({args.dtype})")
        model = random_model(config, device, dtype)
        sync(device)
        wb = weight_bytes(model)
        res["weight_bytes"] = wb
        log(f"built: weights {wb['total'] / 2**30:.2f} GiB, read every step "
            f"{wb['every_step'] / 2**30:.2f} GiB, one expert {wb['per_expert'] / 2**20:.2f} MiB "
            f"x {wb['moe_layers']} MoE layers")
        if "decode" in args.sections:
            for b in batches:
                log(f"dsv2 decode: batch {b}, prompt {args.context}")
                r = guarded(f"dsv2 decode {b}", lambda b=b: dsv2_decode(
                    model, b, args.context, args.warmup_steps, args.decode_steps, args.batched_tokens,
                    args.block_size, opts, args.profile_steps if b == batches[-1] else 0))
                kv = r.get("kv_bytes_per_token") or kv_bytes_per_token(config, None, dtype)
                context = args.context + args.warmup_steps + (args.decode_steps + 1) / 2
                row = {"batch": b, "context": args.context, "dsv2": r,
                       "limit": decode_limit(config, wb, b, context, kv, bandwidth, peak)}
                row["experts_measured"] = _status(guarded("experts", lambda b=b: {
                    "status": "ok", "n": experts_touched(model, b)}), "n") if wb["moe_layers"] else 0.0
                if not isinstance(row["experts_measured"], float):
                    row["experts_measured"] = None
                decode_rows.append(row)
                checkpoint(res, decode_rows, prefill_rows, args.out)
                log(f"  {_rate(r)}, {_fmt(r.get('ms_per_step'), '.2f')} ms/step")
        if "prefill" in args.sections:
            for n, s in prefills:
                log(f"dsv2 prefill: {n}x{s}")
                r = guarded(f"dsv2 prefill {n}x{s}", lambda n=n, s=s: dsv2_prefill(
                    model, n, s, args.prefill_reps, args.prefill_warmup, args.batched_tokens, args.block_size,
                    opts, args.profile_prefill))
                prefill_rows.append({"row": f"{n}x{s}", "n": n, "s": s, "dsv2": r,
                                     "limit": prefill_limit(config, wb, n, s, bandwidth, peak)})
                checkpoint(res, decode_rows, prefill_rows, args.out)
                log(f"  {_rate(r)}")
        if "longctx" in args.sections:
            res["longctx"] = run_longctx(model, config, wb, args, bandwidth, peak, opts)
            checkpoint(res, decode_rows, prefill_rows, args.out)
        del model
        free_memory()

        if not args.skip_hf and hf_version is None:
            log("transformers is not installed: no transformers rows")
        elif not args.skip_hf:
            log(f"building transformers {hf_version} DeepseekV2ForCausalLM on {device}")
            built = guarded("transformers build",
                            lambda: {"status": "ok", "pair": build_hf(config, device, dtype)})
            if built.get("status") == "ok":
                hf, res["transformers_impl"] = built.pop("pair")
                log(f"built: {res['transformers_impl']}")
                for row in decode_rows:
                    b = row["batch"]
                    log(f"transformers decode: batch {b}, prompt {args.context}")
                    row["transformers"] = guarded(f"transformers decode {b}", lambda b=b: hf_decode(
                        hf, b, args.context, args.warmup_steps, args.decode_steps))
                    checkpoint(res, decode_rows, prefill_rows, args.out)
                    log(f"  {_rate(row['transformers'])}")
                for row in prefill_rows:
                    log(f"transformers prefill: {row['row']}")
                    row["transformers"] = guarded(f"transformers prefill {row['row']}", lambda r=row: (
                        hf_prefill(hf, r["n"], r["s"], args.prefill_reps, args.prefill_warmup)))
                    log(f"  {_rate(row['transformers'])}")
                del hf
            else:
                for row in decode_rows + prefill_rows:
                    row["transformers"] = built
            free_memory()
    for row in decode_rows + prefill_rows:
        ours, hf = _status(row["dsv2"]), _status(row.get("transformers"))
        row["pct_limit"] = ours / row["limit"]["tok_s"] * 100 if isinstance(ours, float) else None
        both = isinstance(ours, float) and isinstance(hf, float)
        row["ratio_vs_transformers"] = ours / hf if both else None
    res["decode"], res["prefill"] = decode_rows, prefill_rows

    if "maxtp" in args.sections:
        def partial(rows):
            res["max_throughput"] = {"models": rows, "partial": True}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=2, default=str))
        res["max_throughput"] = run_max_throughput(args, device, dtype, bandwidth, opts, peak, partial)

    res["complete"] = True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str))
    print_tables(res)
    print(f"\nJSON: {args.out}")
    plot(res, args.plot)
    return res


if __name__ == "__main__":
    main()

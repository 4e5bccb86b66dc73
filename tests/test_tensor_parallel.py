"""Tensor and expert parallelism for inference (model/tensor_parallel.py) on several gloo processes
against one process: each rank loads only its slices of the checkpoint, and the logits equal the
whole model's up to fp32 summation order."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv2.checkpoint import load_model, random_model, save_model
from dsv2.config import preset
from dsv2.model.tensor_parallel import LocalExperts, VocabParallelEmbedding, check_config

TOKENS = torch.randint(0, 320, (3, 11), generator=torch.Generator().manual_seed(1))


def _tiny(world: int):
    # group-limited routing with one expert group per rank: a token's experts on topk_group ranks
    return preset("dsv2-tiny", vocab_size=320, n_group=world, topk_group=1)


def _aligned():
    """Every cut on a 128 boundary at world 2, as FP8's blocks need."""
    return preset("dsv2-tiny", vocab_size=320, num_attention_heads=4, qk_nope_head_dim=64, qk_rope_head_dim=64,
                  v_head_dim=128, hidden_size=256, moe_intermediate_size=128, n_shared_experts=2,
                  intermediate_size=256, q_lora_rank=None, kv_lora_rank=64, n_group=2, topk_group=1)


def _rank(rank: int, world: int, store: str, ckpt: str, quantization: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = load_model(ckpt, "cpu", torch.float32, quantization=quantization, tensor_parallel="world")
        with torch.no_grad():
            logits = model(TOKENS)
        full = sum(p.numel() for p in load_model(ckpt, "cpu", torch.float32, quantization=quantization).parameters())
        held = sum(p.numel() for p in model.parameters())
        experts = [m for m in model.modules() if isinstance(m, LocalExperts)]
        torch.save({"logits": logits, "held": held, "full": full, "experts": [e.start for e in experts],
                    "vocab": model.embed_tokens.start if isinstance(model.embed_tokens, VocabParallelEmbedding)
                    else None}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, config, world: int, quantization: str = "none", dtype=torch.float32):
    ckpt = tmp_path / "model"
    if not ckpt.exists():
        save_model(random_model(config, "cpu", dtype, seed=0), ckpt)
    out = tmp_path / f"out{world}"
    mp.spawn(_rank, args=(world, str(tmp_path / f"store{world}"), str(ckpt), quantization, str(out)), nprocs=world)
    whole = load_model(ckpt, "cpu", torch.float32, quantization=quantization)
    with torch.no_grad():
        want = whole(TOKENS)
    return want, [torch.load(f"{out}.{r}") for r in range(world)]


@pytest.mark.parametrize("world", [2])  # world 4: the engine test below, token for token
def test_sharded_logits_equal_the_whole_model(tmp_path, world):
    want, ranks = _run(tmp_path, _tiny(world), world)
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)
        # heads, experts, vocabulary and MLP widths split; the latent projections and norms are whole
        assert got["held"] < 0.6 * got["full"] if world == 2 else got["held"] < 0.4 * got["full"]
        assert got["experts"] == [r * 8 // world] * 2  # both MoE layers: this rank's run of experts
        assert got["vocab"] == r * 320 // world


def _dp_rank(rank: int, world: int, store: str, ckpt: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = load_model(ckpt, "cpu", torch.float32, tensor_parallel="world", data_parallel_attention=True)
        with torch.no_grad():  # each rank its own rows (rank 1 twice rank 0's: the exchange pads)
            logits = model(TOKENS[rank:2 * rank + 1])
        experts = [m.start for m in model.modules() if isinstance(m, LocalExperts)]
        torch.save({"logits": logits, "experts": experts, "heads": model.layers[0].self_attn.n_heads}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_data_parallel_attention_logits_equal_the_whole_model(tmp_path):
    """Each rank runs its own tokens through whole attention and its share of the experts, the MoE
    layers exchanging tokens: every rank's logits are the whole model's on its rows."""
    config, world = _tiny(2), 2
    ckpt = tmp_path / "model"
    save_model(random_model(config, "cpu", torch.float32, seed=0), ckpt)
    mp.spawn(_dp_rank, args=(world, str(tmp_path / "store"), str(ckpt), str(tmp_path / "out")), nprocs=world)
    whole = load_model(ckpt, "cpu", torch.float32)
    for r in range(world):
        got = torch.load(tmp_path / f"out.{r}")
        with torch.no_grad():
            want = whole(TOKENS[r:2 * r + 1])
        torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)
        assert got["experts"] == [r * 8 // world] * 2 and got["heads"] == config.num_attention_heads


def test_fp8_checkpoint_slices_keep_their_blocks(tmp_path):
    """A bf16 checkpoint quantized to FP8 as each rank loads its slices: the same 128 x 128 blocks (and
    logits, the FP8 weights dequantized on the CPU) as the whole model quantized."""
    want, ranks = _run(tmp_path, _aligned(), 2, quantization="fp8", dtype=torch.bfloat16)
    for got in ranks:
        torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)


def test_what_does_not_split_is_named():
    with pytest.raises(ValueError, match="num_attention_heads = 4 does not split over tensor_parallel_size 3"):
        check_config(_tiny(1), 3)
    with pytest.raises(ValueError, match="MHA baseline"):
        check_config(preset("dsv2-tiny-mha"), 2)
    with pytest.raises(ValueError, match="n_routed_experts = 8 does not split over tensor_parallel_size 16"):
        check_config(preset("dsv2-tiny", num_attention_heads=16, vocab_size=512, intermediate_size=160), 16)


def _engine_llm(**kw):
    from dsv2.cli import bundled_model_dir
    from dsv2.engine import LLM

    # a cache too small for every request at once (preemption), chunked prefill, prefix caching
    base = dict(device="cpu", block_size=8, num_blocks=48, max_num_batched_tokens=48, max_num_seqs=12,
                max_model_len=160)
    return LLM(bundled_model_dir(), **{**base, **kw})


def _engine_requests():
    import random

    from dsv2.engine import SamplingParams

    rng = random.Random(0)
    shared = [rng.randrange(2, 8192) for _ in range(16)]  # a common prefix: prefix-cache hits
    prompts = [{"prompt_token_ids": shared[: rng.choice([0, 8, 16])] + [rng.randrange(2, 8192)
                                                                        for _ in range(rng.randrange(1, 40))]}
               for _ in range(24)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 20), ignore_eos=True) for _ in prompts]
    params[::5] = [SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=10, ignore_eos=True, n=2)
                   for i in range(len(params[::5]))]
    params[3] = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=2, logprobs=1)
    return prompts, params


def _tokens(outs):
    return [[o.token_ids for o in out.outputs] for out in outs]


def _prompt_logprobs(outs):
    """Request 3's prompt logprobs, flattened (token, value) in order."""
    return [(t, v) for entry in outs[3].prompt_logprobs[1:] for t, v in sorted(entry.items())]


@pytest.fixture(scope="module")
def one_process_tokens():
    prompts, params = _engine_requests()
    llm = _engine_llm()
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0 and sum(o.num_cached_tokens for o in outs) > 0
    return _tokens(outs), _prompt_logprobs(outs)


def _assert_as_one_process(outs, one_process_tokens):
    tokens, logprobs = one_process_tokens
    assert _tokens(outs) == tokens
    got = _prompt_logprobs(outs)
    assert [t for t, _ in got] == [t for t, _ in logprobs]
    assert [v for _, v in got] == pytest.approx([v for _, v in logprobs], abs=1e-4)


@pytest.mark.parametrize("world", [2, 4])
def test_engine_over_several_processes_gives_the_same_tokens(one_process_tokens, world):
    """LLM(tensor_parallel_size=N) starts N-1 workers (gloo on the CPU); with preemption, prefix hits,
    chunked prefill, seeded sampling and prompt logprobs, every request's tokens (and logprobs) are
    the single-process engine's. At
    world 4 the bundled model's 4 expert groups sit one per rank (device-limited routing)."""
    prompts, params = _engine_requests()
    with _engine_llm(tensor_parallel_size=world) as llm:
        outs = llm.generate(prompts, params)
        assert llm.engine.scheduler.num_preemptions > 0
        procs = llm.workers.procs
    _assert_as_one_process(outs, one_process_tokens)
    assert all(p.exitcode == 0 for p in procs)  # stopped by the leader, not killed


def test_data_parallel_attention_gives_the_same_tokens(one_process_tokens):
    """LLM(tensor_parallel_size=2, data_parallel_attention=True): each rank an engine over its own
    cache (half the blocks of the one-process engine each: preemption), stepped together; every
    request's tokens and logprobs are the single-process engine's, and the engine holds the two caches."""
    prompts, params = _engine_requests()
    with _engine_llm(tensor_parallel_size=2, data_parallel_attention=True, num_blocks=24) as llm:
        outs = llm.generate(prompts, params)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.blocks.num_blocks == 2 * llm.engine.local.blocks.num_blocks == 48
        assert llm.engine.requests == {} and llm.engine.local.requests == {}
        procs = llm.workers.procs
    _assert_as_one_process(outs, one_process_tokens)
    assert all(p.exitcode == 0 for p in procs)


def test_a_dead_worker_fails_the_engine_with_its_name():
    import os
    import signal
    import time

    from dsv2.engine import SamplingParams

    llm = _engine_llm(tensor_parallel_size=2)
    worker = llm.workers.procs[0]
    llm.generate("warm", SamplingParams(max_tokens=2))
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"tensor-parallel worker 1 \(pid \d+\) died with exit code -9"):
        llm.generate(["after"] * 4, SamplingParams(max_tokens=8))
    assert time.monotonic() - start < 15
    llm.close()
    assert not worker.is_alive()


@pytest.mark.parametrize("layout", [[], ["--data-parallel-attention"]])
def test_serve_with_two_processes_answers_the_openai_client(layout):
    import openai

    from .server_util import running_server

    with running_server("--tensor-parallel-size", "2", "--max-model-len", "256", "--num-blocks", "64",
                        *layout) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        two = client.completions.create(model="dsv2-bundled", prompt="Once upon a time", max_tokens=12,
                                        temperature=0.0)
    with _engine_llm() as llm:
        from dsv2.engine import SamplingParams

        one = llm.generate("Once upon a time", SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert two.choices[0].text == one.outputs[0].text


def test_info_gives_one_ranks_share(capsys):
    """`dsv2 info --tensor-parallel-size 8`: DeepSeek-V2's weights over 8 GPUs, each rank with its
    slices plus what every rank keeps whole (latent projections, norms, router), and the whole cache."""
    import json

    from dsv2.cli import main

    assert main(["info", "--preset", "deepseek-v2", "--tensor-parallel-size", "8", "--quantization", "fp8"]) == 0
    info = json.loads(capsys.readouterr().out)
    tp = info["tensor_parallel"]
    assert info["weights"]["gb"] / 8 < tp["weights_per_rank_gb"] < 1.05 * info["weights"]["gb"] / 8
    assert tp["cache_bytes_per_token_per_rank"] == info["kv_cache_per_token"]["mla"]["cache_bytes"]["bfloat16"]
    assert tp["cache_tokens_per_rank"]["80GB"] < tp["cache_tokens_per_rank"]["141GB"]
    assert tp["cache_tokens_engine"] == tp["cache_tokens_per_rank"]  # every rank caches every token
    # data-parallel attention: attention whole on each rank, each rank's cache its own requests'
    assert main(["info", "--preset", "deepseek-v2", "--tensor-parallel-size", "8", "--quantization", "fp8",
                 "--data-parallel-attention"]) == 0
    dp = json.loads(capsys.readouterr().out)["tensor_parallel"]
    assert dp["weights_per_rank_gb"] > tp["weights_per_rank_gb"]
    for gpu, tokens in dp["cache_tokens_per_rank"].items():
        assert dp["cache_tokens_engine"][gpu] == 8 * tokens > 5 * tp["cache_tokens_engine"][gpu]


def test_data_parallel_step_error_keeps_the_ranks_in_step(tmp_path, monkeypatch):
    """A rank whose step raises still meets the others' collectives (a forward of its own), its
    error travels to rank 0 as a StepError naming the requests, and the step's other outputs come
    with the next one. One gloo rank, in this process."""
    from dsv2.cli import bundled_model_dir
    from dsv2.engine import EngineConfig, LLMEngine, SamplingParams
    from dsv2.engine.data_parallel import DataParallelEngine
    from dsv2.engine.engine import StepError

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        local = LLMEngine(load_model(bundled_model_dir(), "cpu", torch.float32), None,
                          EngineConfig(block_size=8, num_blocks=32, max_model_len=64, enforce_eager=True,
                                       async_scheduling=False))
        engine = DataParallelEngine(local)
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        engine.add_request("a", [5, 6, 7], params)
        step = local.step

        def failing():
            step()
            raise StepError(["a"], RuntimeError("boom"))
        monkeypatch.setattr(local, "step", failing)
        forwards = engine._forwards
        with pytest.raises(StepError, match="boom") as info:
            engine.step()
        assert info.value.request_ids == ["a"] and engine._forwards == forwards + 1
        monkeypatch.undo()
        engine.abort_request("a")
        assert engine.step() == [] and engine._forwards == forwards + 2  # idle: a forward of its own
        engine.add_request("b", [5, 6, 7], params)
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    finally:
        dist.destroy_process_group()

"""The engine against the reference generation: the same greedy tokens for many concurrent requests
of mixed lengths with chunked prefill, preemption and prefix-cache hits all forced on."""

import random

import pytest
import torch

from dsv2.engine import LLM, SamplingParams
from dsv2.engine.engine import EngineConfig, LLMEngine
from dsv2.engine.runner import prefill_width

from .conftest import model_with_tokenizer, random_model, tiny_config
from .numerics import MODEL_ULPS, assert_close, assert_greedy, tol


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return model_with_tokenizer(tmp_path_factory.mktemp("model"), seed=31)


def _llm(path, **kw):
    base = dict(device="cpu", block_size=8, num_blocks=64, max_num_batched_tokens=48, max_num_seqs=16,
                max_model_len=256)
    return LLM(path, **{**base, **kw})


def _requests(n, vocab, seed=0):
    rng = random.Random(seed)
    shared = [rng.randrange(2, vocab) for _ in range(20)]  # a common prefix: prefix-cache hits
    prompts, lengths = [], []
    for i in range(n):
        body = [rng.randrange(2, vocab) for _ in range(rng.randrange(1, 60))]
        prompts.append(shared[: rng.choice([0, 8, 17, 20])] + body)
        lengths.append(rng.randrange(1, 24))
    return prompts, lengths


def test_greedy_tokens_equal_the_reference_under_pressure(model_dir):
    path, model, tok = model_dir
    llm = _llm(path)
    prompts, lengths = _requests(56, tok.vocab_size)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in lengths]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, m, out in zip(prompts, lengths, outs):
        assert len(out.outputs[0].token_ids) == m and out.outputs[0].finish_reason == "length"
        assert_greedy(model, p, out.outputs[0].token_ids)
    engine = llm.engine
    assert engine.scheduler.num_preemptions > 0  # the cache was too small for everyone at once
    assert engine.blocks.all_free()
    assert sum(o.num_cached_tokens for o in outs) > 0  # shared prefixes were reused


def test_seeded_sampling_is_reproducible_whatever_the_batch(model_dir):
    path, _, tok = model_dir
    llm = _llm(path)
    prompts, _ = _requests(6, tok.vocab_size, seed=1)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=12, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": prompts[0]}, p)[0].outputs[0].token_ids
    crowd = llm.generate([{"prompt_token_ids": q} for q in prompts],
                         [p] + [SamplingParams(temperature=1.0, max_tokens=12)] * 5)
    assert crowd[0].outputs[0].token_ids == alone


def test_async_scheduling_changes_nothing_but_timing(model_dir):
    """Launching each step before reading the last one's tokens back gives the very same outputs:
    greedy and seeded rows, stop strings and stop tokens (the token in flight after a stop is
    dropped), n > 1, and penalty and logprobs rows (which run their steps synchronously)."""
    path, _, tok = model_dir
    prompts, lengths = _requests(24, tok.vocab_size, seed=5)
    text = tok.decode(prompts[3][-6:])
    kinds = [
        lambda m: SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True),
        lambda m: SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=m),
        lambda m: SamplingParams(temperature=0.0, max_tokens=m + 8, stop=[text[-2:], " the"]),
        lambda m: SamplingParams(temperature=0.0, max_tokens=m + 8, stop_token_ids=[prompts[0][-1], 5]),
        lambda m: SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=m),
        lambda m: SamplingParams(temperature=0.0, max_tokens=m, repetition_penalty=1.3, frequency_penalty=0.5),
        lambda m: SamplingParams(temperature=0.0, max_tokens=m, logprobs=2),
    ]
    params = [kinds[i % len(kinds)](m) for i, m in enumerate(lengths)]
    runs, logprobs = [], []
    for async_scheduling in (True, False):
        llm = _llm(path, async_scheduling=async_scheduling)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        runs.append([[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs])
        logprobs.append([v for o in outs for c in o.outputs for step in c.logprobs or [] for v in step.values()])
        assert llm.engine.blocks.all_free()
    # Batches differ in composition between the two runs, so rows may round differently (GEMMs of
    # another height): the tokens are still compared exactly, since a greedy or seeded choice flips
    # only if its margin is below that rounding (~1e-7 of a logit, a chance of about that much per
    # token); the logprobs, continuous, within the rounding of log-softmaxes of ~1e1.
    assert runs[0] == runs[1]
    assert logprobs[0] == pytest.approx(logprobs[1], abs=tol(torch.float32, 2**7))
    assert any(c[2] == "stop" for o in runs[0] for c in o)  # some stop rule fired early


def test_prompt_logprobs_equal_the_model_over_the_whole_prompt(model_dir):
    """prompt_logprobs as vLLM gives them (None first, then {token: logprob} of the top N and of the
    prompt token itself), computed over chunked prefills, equal to one forward over each prompt;
    a prompt whose prefix sits in the prefix cache is still scored from its first token."""
    path, model, tok = model_dir
    llm = _llm(path, max_num_batched_tokens=24)  # prompts of up to 80 tokens: several chunks
    prompts, _ = _requests(12, tok.vocab_size, seed=9)
    warm = llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], SamplingParams(max_tokens=1))
    assert len(warm) == 4
    params = [SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=k % 3 * 2, n=1 + (k == 5))
              for k in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    close = tol(torch.float32, MODEL_ULPS)  # chunked prefills against one forward: another op sequence
    for p, params_k, out in zip(prompts, params, outs):
        with torch.no_grad():
            want = model(torch.tensor([p])).float().log_softmax(-1)[0]
        got = out.prompt_logprobs
        assert len(got) == len(p) and got[0] is None
        for i in range(1, len(p)):
            entry = got[i]
            assert p[i] in entry and len(entry) <= params_k.prompt_logprobs + 1
            assert entry[p[i]] == pytest.approx(want[i - 1, p[i]].item(), abs=close)
            top = want[i - 1].topk(params_k.prompt_logprobs).indices.tolist() if params_k.prompt_logprobs else []
            assert set(top) <= set(entry)
            for t, v in entry.items():
                assert v == pytest.approx(want[i - 1, t].item(), abs=close)
        assert_greedy(model, p, out.outputs[0].token_ids)
    assert sum(o.num_cached_tokens for o in outs) == 0  # scored prompts take no cached blocks
    assert llm.engine.blocks.all_free()
    plain = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=1))[0]
    assert plain.prompt_logprobs is None
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_n_samples_and_text(model_dir):
    path, _, tok = model_dir
    llm = _llm(path)
    out = llm.generate("The quick brown", SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)


def test_abort_frees_every_page(model_dir):
    path, _, tok = model_dir
    llm = _llm(path)
    engine = llm.engine
    prompts, _ = _requests(10, tok.vocab_size, seed=2)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert not engine.blocks.all_free()
    for i in range(len(prompts)):
        engine.abort_request(f"r{i}")
    assert engine.blocks.all_free() and not engine.has_unfinished_requests()


def test_bad_requests(model_dir):
    path, _, _ = model_dir
    llm = _llm(path, max_model_len=128)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 120}, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="token ids"):
        llm.generate({"prompt_token_ids": [10**6]})
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        _llm(path, kv_cache_dtype="int3")


def test_chat_applies_the_template(model_dir):
    path, model, tok = model_dir
    llm = _llm(path)
    messages = [{"role": "user", "content": "hello fox"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert out.prompt_token_ids == ids
    assert_greedy(model, ids, out.outputs[0].token_ids)


def test_async_streams_and_aborts(model_dir):
    import asyncio

    from dsv2.engine import AsyncLLM

    path, model, tok = model_dir
    llm = AsyncLLM(path, device="cpu", block_size=8, num_blocks=64, max_model_len=256)
    prompts, _ = _requests(12, tok.vocab_size, seed=4)

    async def collect(p, n):
        texts, last = [], None
        async for out in llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=n,
                                                                              ignore_eos=True)):
            texts.append(out.new_text[0])
            last = out
        return texts, last

    async def leave_early(p):
        seen = 0
        async for _ in llm.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=150, ignore_eos=True)):
            seen += 1
            if seen == 3:
                break
        return seen

    async def main():
        results = await asyncio.gather(*[collect(p, 10) for p in prompts[:8]],
                                       *[leave_early(p) for p in prompts[8:]])
        for p, (texts, last) in zip(prompts[:8], results[:8]):
            assert last.finished and len(last.outputs[0].token_ids) == 10
            assert_greedy(model, p, last.outputs[0].token_ids)
            assert "".join(texts) == last.outputs[0].text
            assert len(texts) > 1  # streamed, not delivered at once
        assert results[8:] == [3] * 4
        for _ in range(200):  # the aborts land on the engine thread's next pass
            if llm.engine.blocks.all_free() and not llm.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        assert llm.engine.blocks.all_free()
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in llm.generate({"prompt_token_ids": [5] * 250}, SamplingParams(max_tokens=20)):
                pass

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()


def test_engine_without_tokenizer_returns_token_ids():
    model = random_model(tiny_config(), seed=3)
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=4, num_blocks=64, block_size=8, max_model_len=128))
    engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=6, temperature=0.0))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(outs[-1].outputs[0].token_ids) == 6 and outs[-1].outputs[0].text == ""
    assert_greedy(model, [1, 2, 3, 4, 5], outs[-1].outputs[0].token_ids)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add_request("b", [1, 2], SamplingParams(max_tokens=2, stop=["x"]))


def test_final_only_outputs_once_with_the_same_tokens():
    """output_kind "final_only" (vLLM's FINAL_ONLY, what LLM.generate asks for): one output per
    request, when all its samples have finished, equal to the last cumulative one."""
    model = random_model(tiny_config(), seed=3)
    runs = {}
    for kind in ("cumulative", "final_only"):
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=4, num_blocks=64, block_size=8, max_model_len=128))
        engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=6, temperature=0.0, output_kind=kind))
        engine.add_request("b", [7, 8], SamplingParams(n=2, max_tokens=9, temperature=1.0, seed=1, output_kind=kind))
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        runs[kind] = outs
    final = {o.request_id: o for o in runs["cumulative"] if o.finished}
    assert len(runs["cumulative"]) > 2 and len(runs["final_only"]) == 2
    for out in runs["final_only"]:
        assert out.finished
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in final[out.request_id].outputs]
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="delta")


def test_prefill_width_buckets():
    assert [prefill_width(n) for n in (2, 16, 17, 24, 25, 33, 1025, 1536, 1537, 2048)] == \
        [16, 16, 24, 24, 32, 48, 1536, 1536, 2048, 2048]
    # padding costs at most a third of a captured step
    assert all(n <= prefill_width(n) <= max(16, 1.5 * n) for n in range(2, 5000))


def test_warmup_leaves_the_engine_as_new(model_dir):
    """Warm-up runs real requests through every graph batch size and a chunked long prompt; after
    it the cache is all free, nothing is cached or counted, and outputs equal a fresh engine's."""
    path, _, _ = model_dir
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in _llm(path).generate([{"prompt_token_ids": p} for p in prompts], params)]
    llm = _llm(path)
    report = llm.engine.warmup()
    assert report["batch_sizes"] == llm.engine.runner.graph_sizes
    assert report["long_prompt"] > llm.engine.cfg.max_num_batched_tokens  # chunked: fresh, then cached
    blocks = llm.engine.blocks
    assert blocks.all_free() and blocks.num_cached_blocks == 0 and blocks.prefix_cache_queries == 0
    assert not llm.engine.has_unfinished_requests()
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert got == want


def test_decode_through_the_cache_ops_equals_the_gather_path(model_dir):
    """The model's side of the CUDA decode path (MLA._paged_decode: the cache's prologue, W^UK and
    W^UV per head, the paged attention op), run on CPU where those ops are their references: the
    logits of the gather path, and the same latents written to the pages."""
    path, model, tok = model_dir
    engine = LLMEngine(model, tok, EngineConfig(block_size=8, num_blocks=64, max_model_len=256,
                                                max_num_batched_tokens=256, async_scheduling=False))
    prompts, _ = _requests(5, tok.vocab_size, seed=3)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        engine.step()
    batch = engine.scheduler.schedule()
    assert len(batch.items) == 5 and all(n == 1 for _, n in batch.items)
    runner, pages = engine.runner, engine.runner.pages
    assert not runner.use_kernel and not runner.use_graphs
    gathered = runner.run(batch.items).clone()
    slots = torch.tensor([s.block_table[s.num_computed_tokens // 8] * 8 + s.num_computed_tokens % 8
                          for s, _ in batch.items])
    rows = pages.kv.view(model.config.num_hidden_layers, -1, pages.width)  # [layers, slots, width]
    written = rows[:, slots].clone()
    rows[:, slots] = 0  # this step's latents, to be written again
    runner.use_kernel = True  # PagedBatchCache(decode_kernel=True): the ops' CPU references
    through_ops = runner.run(batch.items)
    # the same math by another op sequence (the cache ops' CPU references): logits within the
    # model's rounding, the latents (a projection and a norm, O(1)) within a few ulps
    assert_close(through_ops, gathered, MODEL_ULPS)
    assert_close(rows[:, slots], written, 2**5)
    assert written.abs().sum(-1).gt(0).all()  # every layer wrote a real row


def test_compiled_blocks_are_one_program_for_every_layer():
    """Steps are compiled block by block (on CUDA): each block takes its layer's part of the cache,
    not its index, so one compiled program serves every layer and a new kind of step compiles one
    block, not the model unrolled. Forced on CPU (dynamo's graphs run by aot_eager): a prefill and
    decodes through compiled parts give the eager tokens, and the four layers' blocks are two
    programs, one per kind of step, where a layer index in the graph would make eight."""
    import torch
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from dsv2.engine import runner as runner_module

    model = random_model(tiny_config(num_hidden_layers=4, first_k_dense_replace=4, vocab_size=300), seed=2)

    def tokens(compiled):
        engine = LLMEngine(model, None, EngineConfig(block_size=16, num_blocks=8, max_model_len=64,
                                                     async_scheduling=False))
        if compiled:
            engine.runner.compiled = engine.runner.compile_prefill = True
            engine.runner._compile(backend="aot_eager")
        engine.add_request("r", [5, 6, 7, 8, 9, 10, 11], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        return next(o for _ in range(8) for o in engine.step() if o.finished).outputs[0].token_ids

    torch._dynamo.reset()
    assert tokens(compiled=True) == tokens(compiled=False)
    # a fresh prefill of one row, then decodes of one row
    assert len(_debug_get_cache_entry_list(runner_module._block_stream.__code__)) == 2


def test_a_failing_step_names_its_requests_and_the_rest_go_on(model_dir, monkeypatch):
    """A step that raises while running (out of memory, say) raises StepError naming the requests
    it carried; once they are aborted, the ones that were waiting run as if nothing happened."""
    from dsv2.engine.engine import StepError

    path, model, tok = model_dir
    engine = LLMEngine(model, tok, EngineConfig(block_size=8, num_blocks=64, max_model_len=256, max_num_seqs=2,
                                                max_num_batched_tokens=256))
    run = engine.runner.run

    def faulty(items, *args, **kw):
        if any(7 in seq.prompt_token_ids for seq, _ in items):
            raise torch.OutOfMemoryError("injected")
        return run(items, *args, **kw)

    monkeypatch.setattr(engine.runner, "run", faulty)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = {"bad": [5, 7, 9], "also-running": [5, 6, 8], "waiting": [11, 12, 13, 14]}
    for rid, p in prompts.items():
        engine.add_request(rid, p, params)
    with pytest.raises(StepError) as e:
        engine.step()  # max_num_seqs=2: the first two run together, the third waits
    assert e.value.request_ids == ["also-running", "bad"] and isinstance(e.value.cause, torch.OutOfMemoryError)
    for rid in e.value.request_ids:
        engine.abort_request(rid)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert list(done) == ["waiting"] and engine.blocks.all_free()
    assert_greedy(model, prompts["waiting"], done["waiting"])


def test_chunked_prefill_past_the_yarn_window_equals_one_forward(tmp_path):
    """A 200-token prompt under a 48-token step budget (five chunks) on a model whose YaRN window
    was 32 tokens stretched 8x: the prompt logprobs of the chunked prefill are one full-length
    forward's, position for position, far past the original window."""
    from dsv2.checkpoint import save_model
    from dsv2.tokenizer import train_bpe

    from .conftest import TEXTS

    yarn = dict(type="yarn", factor=8, original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
                mscale=0.707, mscale_all_dim=0.707)
    tok = train_bpe(TEXTS * 10, vocab_size=300)
    model = random_model(tiny_config(vocab_size=tok.vocab_size, rope_scaling=yarn, max_position_embeddings=256),
                         seed=4, std=0.2)
    save_model(model, tmp_path)
    tok.save(tmp_path)
    llm = _llm(tmp_path, max_num_batched_tokens=48, max_model_len=256)
    prompt = random.Random(2).choices(range(2, tok.vocab_size), k=200)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    with torch.no_grad():
        want = model(torch.tensor([prompt])).float().log_softmax(-1)[0]
    close = tol(torch.float32, MODEL_ULPS)
    got = [out.prompt_logprobs[i][prompt[i]] for i in range(1, len(prompt))]
    expected = [want[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert got == pytest.approx(expected, abs=close)


def test_llm_tokenizer_options_as_vllm(model_dir, tmp_path):
    """LLM(tokenizer=DIR) takes another directory's tokenizer; skip_tokenizer_init=True needs none
    (token ids in and out); seed= makes unseeded sampling reproducible."""
    from dsv2.checkpoint import save_model

    path, model, tok = model_dir
    bare = tmp_path / "bare"
    save_model(model, bare)  # weights only, no tokenizer.json
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        _llm(bare)
    ids = tok.encode("The quick brown", add_bos=tok.bos_token_id is not None)  # as LLM encodes text
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    want = _llm(path).generate({"prompt_token_ids": ids}, greedy)[0].outputs[0].token_ids
    raw = _llm(bare, skip_tokenizer_init=True)
    out = raw.generate({"prompt_token_ids": ids}, greedy)[0].outputs[0]
    assert out.token_ids == want and out.text == ""
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        raw.generate("The quick brown", greedy)
    assert _llm(bare, tokenizer=path).generate("The quick brown", greedy)[0].outputs[0].token_ids == want
    free = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    runs = [_llm(path, seed=7).generate({"prompt_token_ids": ids}, free)[0].outputs[0].token_ids for _ in range(2)]
    assert runs[0] == runs[1]

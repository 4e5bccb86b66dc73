"""Structured outputs on CUDA: the sampler's masks and biases on the device equal the CPU's, and the
bundled model with CUDA graphs and async scheduling on serves constrained and free requests
together, every constrained output following its spec."""

import pytest
import torch

from dsv2.engine import LLM, SamplingParams, StructuredOutputsParams
from dsv2.engine.sampler import RowState, Sampler, make_generator
from dsv2.engine.structured import GrammarCompiler
from dsv2.resources import bundled_model_dir
from dsv2.tokenizer import Tokenizer

from .structured_util import CHOICES, LARK, PROMPTS, REGEX, SCHEMAS, USER, check_output

pytestmark = pytest.mark.gpu


def test_masks_and_bias_on_cuda_equal_the_cpu():
    tokenizer = Tokenizer.from_dir(bundled_model_dir())
    grammars = GrammarCompiler(tokenizer, 8192)
    specs = [StructuredOutputsParams(json=USER), StructuredOutputsParams(choice=CHOICES), None,
             StructuredOutputsParams(regex=REGEX), None]
    masks = grammars.fill_bitmask([grammars.grammar(s) for s in specs if s is not None])
    allowed = iter(masks)
    params = [SamplingParams(temperature=[0, 0.7][i % 2], logit_bias={11: 5.0, 300: -100} if i % 3 else None,
                             min_tokens=2, stop_token_ids=[7]) for i in range(len(specs))]
    rows = [RowState(p, [1, 2], [3], None, tokenizer.eos_token_id, None if s is None else next(allowed))
            for p, s in zip(params, specs)]
    logits = torch.randn(len(rows), 8192, generator=torch.Generator().manual_seed(0)) * 4
    on_cpu = Sampler().process(logits, rows)
    on_gpu = Sampler().process(logits.cuda(), rows).cpu()
    assert torch.equal(torch.isfinite(on_cpu), torch.isfinite(on_gpu))
    torch.testing.assert_close(on_gpu, on_cpu)
    # drawn on the device: constrained rows draw allowed tokens
    seeded = [RowState(r.params, [1, 2], [3], make_generator(i, "cuda"), r.eos_id, r.allowed)
              for i, r in enumerate(rows)]
    tokens = Sampler()(logits.cuda(), seeded).token_ids.tolist()
    for i, t in enumerate(tokens):
        assert torch.isfinite(on_cpu[i, t])


def test_constrained_and_free_requests_with_graphs_and_async_scheduling():
    # graphs without torch.compile: the same captured steps, minutes less to build
    llm = LLM(bundled_model_dir(), device="cuda", max_model_len=512, num_blocks=64, block_size=64, compile=False)
    engine = llm.engine
    assert engine.runner.use_graphs and engine.cfg.async_scheduling
    jobs = []
    for i, schema in enumerate(SCHEMAS):
        for compact in (True, False):
            for temperature in (0, 0.8):
                jobs.append((PROMPTS[i], SamplingParams(
                    temperature=temperature, seed=i, max_tokens=96 if compact else 400,
                    structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=compact))))
    for j, spec in enumerate([StructuredOutputsParams(regex=REGEX), StructuredOutputsParams(choice=CHOICES),
                              StructuredOutputsParams(grammar=LARK)]):
        for temperature in (0, 0.8):
            jobs.append((PROMPTS[j], SamplingParams(temperature=temperature, seed=j, max_tokens=32,
                                                    structured_outputs=spec)))
    for i in range(16):
        jobs.append((PROMPTS[i % 4], SamplingParams(temperature=[0, 0.9][i % 2], seed=i, max_tokens=48,
                                                    ignore_eos=True)))
    outs = llm.generate([p for p, _ in jobs], [params for _, params in jobs])
    for (_, params), out in zip(jobs, outs):
        c = out.outputs[0]
        if params.structured_outputs is not None:
            check_output(params.structured_outputs, c.text, c.finish_reason)
        else:
            assert len(c.token_ids) == 48 and c.finish_reason == "length"
    assert engine.runner.graphs, "no step was captured"
    assert engine.blocks.all_free()
    # free requests alone go back to async steps (one in flight)
    engine.add_request("free", [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine._inflight is not None
    while engine.has_unfinished_requests():
        engine.step()

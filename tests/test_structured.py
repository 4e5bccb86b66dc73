"""Structured outputs and logit_bias: the parameters, the grammar cache, the sampler's masks and
biases against the slow twin, and the bundled model through the engine with many concurrent mixed
requests (constrained by schemas, regexes, choices and grammars beside free ones), where every
constrained output must follow its spec."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dsv2.engine import LLM, SamplingParams, StructuredOutputsParams
from dsv2.engine import sampler as sampler_module
from dsv2.engine.sampler import RowState, Sampler, make_generator
from dsv2.engine.structured import GrammarCompiler, allows, unpack
from dsv2.resources import bundled_model_dir
from dsv2.tokenizer import Tokenizer

from .numerics import assert_greedy
from .test_engine_sampler import assert_process_matches_reference
from .structured_util import CHOICES, LARK, NEVER, PROMPTS, REGEX, SCHEMAS, USER, check_output


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(bundled_model_dir())


@pytest.fixture(scope="module")
def llm():
    # a cache small enough that the concurrent test preempts (a matcher then survives a recompute)
    return LLM(bundled_model_dir(), device="cpu", max_model_len=256, block_size=16, num_blocks=16,
               max_num_seqs=48, max_num_batched_tokens=256)


# --- parameters ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": "[1, 2]"}, "JSON schema object"),
    ({"json": {"type": "number", "maximum": float("nan")}}, "not a JSON value"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", 3]}, "non-empty list"),
    ({"regex": 5}, "regex must be a str"),
    ({"json_object": "yes"}, "json_object must be a bool"),
])
def test_structured_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


def test_structured_params_key_is_canonical():
    a = StructuredOutputsParams(json={"type": "object", "required": ["a"]})
    b = StructuredOutputsParams(json='{"required": ["a"], "type": "object"}')
    assert a.key == b.key and a.json == b.json
    assert StructuredOutputsParams(json_object=True).key != StructuredOutputsParams(json_object=True,
                                                                                    disable_any_whitespace=True).key


@pytest.mark.parametrize("bias, message", [
    ({5: 100.5}, r"\[-100, 100\]"), ({5: -101}, r"\[-100, 100\]"), ({-1: 1.0}, "non-negative"),
    ({"5": 1.0}, "non-negative"), ({5: float("inf")}, "finite"), ([5], "dict"),
])
def test_logit_bias_validation(bias, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(logit_bias=bias)


def test_logit_bias_bounds_accepted():
    assert SamplingParams(logit_bias={0: -100, 7: 100}).logit_bias == {0: -100.0, 7: 100.0}
    assert SamplingParams(logit_bias={}).logit_bias is None


# --- the grammar cache -----------------------------------------------------------------------------

def test_grammars_compile_once_and_the_cache_is_bounded(tokenizer):
    grammars = GrammarCompiler(tokenizer, 8192, cache_size=2)
    grammars.compile(StructuredOutputsParams(json=USER))
    grammars.compile(StructuredOutputsParams(json=json.dumps(dict(reversed(USER.items())))))  # same schema
    assert grammars.compiled == 1
    first, second = grammars.grammar(StructuredOutputsParams(json=USER)), grammars.grammar(
        StructuredOutputsParams(json=USER))
    assert first.matcher is not second.matcher  # each sequence its own state
    grammars.compile(StructuredOutputsParams(regex=REGEX))
    grammars.compile(StructuredOutputsParams(choice=CHOICES))  # evicts USER, the least recently used
    grammars.compile(StructuredOutputsParams(regex=REGEX))
    assert grammars.compiled == 3
    grammars.compile(StructuredOutputsParams(json=USER))
    assert grammars.compiled == 4
    for _ in range(2):  # a malformed spec's error is cached too
        with pytest.raises(ValueError, match="(?s)invalid regex.*unclosed character class"):
            grammars.compile(StructuredOutputsParams(regex="[0-9"))
    assert grammars.compiled == 5


@pytest.mark.parametrize("spec, message", [
    (dict(json={"type": "foo"}), "invalid JSON schema: Invalid type: foo"),
    (dict(json={"type": "string", "minLength": 3, "maxLength": 1}), "Unsatisfiable schema"),
    (dict(json={"$ref": "#/nowhere"}), "invalid JSON schema"),
    (dict(grammar="start: foo"), 'invalid grammar:.*unknown name: "foo"'),
    (dict(grammar='root ::= "a'), "invalid grammar"),
])
def test_malformed_specs_say_why(tokenizer, spec, message):
    with pytest.raises(ValueError, match=message):
        GrammarCompiler(tokenizer, 8192).compile(StructuredOutputsParams(**spec))


def test_bitmask_is_the_grammars_next_tokens(tokenizer):
    grammars = GrammarCompiler(tokenizer, 8192)
    g = [grammars.grammar(StructuredOutputsParams(choice=["yes", "no"])),
         grammars.grammar(StructuredOutputsParams(grammar=NEVER))]
    mask = grammars.fill_bitmask(g)
    assert mask.shape == (2, 8192 // 32) and mask.dtype == torch.int32
    allowed = unpack(mask, 8192)
    texts = {tokenizer.decode([t]) for t in allowed[0].nonzero().flatten().tolist()}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts)
    assert g[0].error is None and allows(mask[0], tokenizer.encode("yes")[0])
    # the grammar nothing completes: failed, EOS alone allowed
    assert g[1].error is not None and allowed[1].nonzero().flatten().tolist() == [tokenizer.eos_token_id]


# --- the sampler -----------------------------------------------------------------------------------

def _packed(allowed: list[int], vocab: int) -> torch.Tensor:
    bits = torch.zeros(-(-vocab // 32) * 32, dtype=torch.bool)
    bits[allowed] = True
    return (bits.view(-1, 32).long() << torch.arange(32)).sum(1).to(torch.int64).to(torch.int32)


def _row(allowed=None, vocab=64, output=(), eos_id=None, **params) -> RowState:
    p = SamplingParams(**params)
    mask = None if allowed is None else _packed(allowed, vocab)
    return RowState(p, [], list(output), make_generator(p.seed, "cpu"), eos_id, mask)


def test_masks_and_bias_match_the_reference_twin():
    torch.manual_seed(0)
    vocab, g = 64, torch.Generator().manual_seed(1)
    rows = []
    for i in range(24):
        allowed = None if i % 3 == 0 else torch.randperm(vocab, generator=g)[: 1 + i].tolist()
        bias = None if i % 2 else {int(t): float(b) for t, b in zip(torch.randint(0, vocab, (4,), generator=g),
                                                                     torch.randn(4, generator=g) * 30)}
        rows.append(_row(allowed, vocab, output=[1, 2, 2], eos_id=5, logit_bias=bias, min_tokens=(i % 4) * 2,
                         temperature=[0, 0.7][i % 2], top_k=[0, 5][i % 2], repetition_penalty=[1.0, 1.2][i % 2],
                         stop_token_ids=[9]))
    logits = torch.randn(len(rows), vocab) * 3
    assert_process_matches_reference(logits, rows)
    tokens = Sampler()(logits, rows).token_ids.tolist()
    for r, t in zip(rows, tokens):
        assert r.allowed is None or allows(r.allowed, t)


def test_free_rows_pay_nothing_for_masks(monkeypatch):
    """No row constrained: no mask work at all; some constrained: only those rows change."""
    torch.manual_seed(0)
    logits = torch.randn(4, 64)
    free = [_row(temperature=0.5, seed=i) for i in range(4)]
    monkeypatch.setattr(sampler_module, "unpack", lambda *a: pytest.fail("mask work for free rows"))
    plain = Sampler().process(logits, free)
    monkeypatch.undo()
    mixed = free[:2] + [_row([3, 4], temperature=0.5, seed=2), _row([7], temperature=0.5, seed=3)]
    out = Sampler().process(logits, mixed)
    assert torch.equal(out[:2], plain[:2])
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [3, 4]
    assert Sampler()(logits, mixed).token_ids[3].item() == 7


def test_grammar_wins_over_min_tokens():
    """A completed grammar allows only EOS; min_tokens must not leave the row with nothing."""
    logits = torch.randn(2, 64)
    rows = [_row([5], eos_id=5, min_tokens=4, temperature=0), _row([5, 6], eos_id=5, min_tokens=4, seed=0)]
    assert Sampler()(logits, rows).token_ids.tolist() == [5, 6]


def test_logit_bias_forces_and_bans_in_the_sampler():
    torch.manual_seed(0)
    logits = torch.randn(3, 64) * 5
    best = logits.argmax(-1)
    rows = [_row(temperature=0, logit_bias={11: 100}), _row(temperature=0, logit_bias={int(best[1]): -100}),
            _row(temperature=1.0, seed=0, logit_bias={11: 100})]
    out = Sampler()(logits, rows)
    assert out.token_ids[0] == 11 and out.token_ids[1] != best[1] and out.token_ids[2] == 11
    # logprobs stay the model's, before the bias
    torch.testing.assert_close(out.logprobs[0], logits[0].log_softmax(-1)[11])


# --- the engine: the bundled model -----------------------------------------------------------------

def _mixed_requests():
    """(prompt, params) of constrained requests of every kind and free ones, greedy and sampled."""
    jobs = []
    for i, schema in enumerate(SCHEMAS):
        for compact in (True, False):
            for temperature in (0, 0.8):
                spec = StructuredOutputsParams(json=schema, disable_any_whitespace=compact)
                # room for whitespace: the bundled model fills every gap the grammar allows
                jobs.append((PROMPTS[i], SamplingParams(temperature=temperature, seed=i, structured_outputs=spec,
                                                        max_tokens=96 if compact else 230)))
    for temperature in (0, 0.8):
        for j, spec in enumerate([StructuredOutputsParams(regex=REGEX), StructuredOutputsParams(choice=CHOICES),
                                  StructuredOutputsParams(grammar=LARK)]):
            jobs.append((PROMPTS[j], SamplingParams(temperature=temperature, seed=j, max_tokens=32,
                                                    structured_outputs=spec)))
    jobs.append((PROMPTS[0], SamplingParams(n=2, temperature=0.8, seed=9, max_tokens=96, structured_outputs=(
        StructuredOutputsParams(json=USER, disable_any_whitespace=True)))))
    for i in range(8):  # free ones between them, some greedy
        jobs.append((PROMPTS[i % 4], SamplingParams(temperature=[0, 0.9][i % 2], seed=i, max_tokens=24,
                                                    ignore_eos=True)))
    return jobs


def test_concurrent_mixed_requests_all_follow_their_specs(llm):
    jobs = _mixed_requests()
    preemptions = llm.engine.scheduler.num_preemptions
    outs = llm.generate([p for p, _ in jobs], [params for _, params in jobs])
    assert llm.engine.scheduler.num_preemptions > preemptions  # the matchers survived recomputes
    for (prompt, params), out in zip(jobs, outs):
        for c in out.outputs:
            if params.structured_outputs is not None:
                check_output(params.structured_outputs, c.text, c.finish_reason)
            else:
                assert len(c.token_ids) == params.max_tokens and c.finish_reason == "length"
                if params.greedy:  # untouched by the masks of the rows beside them
                    assert_greedy(llm.model, out.prompt_token_ids, c.token_ids)
    assert llm.engine.blocks.all_free()


def test_json_object_gives_json(llm):
    # any object is unbounded (a small model may write one key after another); a few-shot prompt
    # makes short ones likely, and every one that ended must be a JSON object
    shots = 'd = {"name": "Hamlet", "age": 30}\nd = {"name": "Romeo", "age": 17}\nd = '
    params = [SamplingParams(temperature=t, seed=s, max_tokens=64, structured_outputs=StructuredOutputsParams(
        json_object=True, disable_any_whitespace=True)) for t, s in [(0, 0), (0.8, 1), (0.8, 2), (0.8, 3)]]
    outs = llm.generate([shots] * len(params), params)
    stopped = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(stopped) >= 2
    for c in stopped:
        assert isinstance(json.loads(c.text), dict), c.text


def test_a_grammar_nothing_completes_ends_with_stop(llm, caplog):
    never = StructuredOutputsParams(grammar=NEVER)
    outs = llm.generate(["Hi", "Hi", "Hi"], [
        SamplingParams(temperature=0, max_tokens=50, structured_outputs=never),
        SamplingParams(max_tokens=50, ignore_eos=True, min_tokens=5, structured_outputs=never),  # ends all the same
        SamplingParams(temperature=0, max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[a-z]{50}")),
    ])
    for out in outs[:2]:
        assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text == ""
        assert len(out.outputs[0].token_ids) == 1
    assert "no text can complete the grammar" in caplog.text
    short = outs[2].outputs[0]  # a budget too small for the regex: cut at max_tokens
    assert short.finish_reason == "length" and len(short.token_ids) == 4 and re.fullmatch("[a-z]+", short.text)


def test_malformed_specs_are_refused_before_queuing(llm):
    for spec in (StructuredOutputsParams(json={"type": "foo"}), StructuredOutputsParams(regex="(")):
        with pytest.raises(ValueError, match="invalid"):
            llm.generate("Hi", SamplingParams(structured_outputs=spec))
    with pytest.raises(ValueError, match="logit_bias token ids must be in"):
        llm.generate("Hi", SamplingParams(logit_bias={8192: 1.0}))
    assert not llm.engine.has_unfinished_requests()


def test_logit_bias_forces_and_bans(llm, tokenizer):
    forced = tokenizer.encode(" the")[0]
    outs = llm.generate(PROMPTS[:2], [SamplingParams(temperature=0, max_tokens=6, logit_bias={forced: 100}),
                                      SamplingParams(temperature=1.0, seed=0, max_tokens=6, logit_bias={forced: 100})])
    assert all(o.outputs[0].token_ids == [forced] * 6 for o in outs)
    free = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    banned = {t for o in free for t in o.outputs[0].token_ids}
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                logit_bias=dict.fromkeys(banned, -100)))
    assert all(not banned & set(o.outputs[0].token_ids) for o in outs)


def test_constrained_steps_run_synchronously(llm):
    """Under async scheduling a step with a constrained row reads its tokens back at once (its
    mask needs them); steps of free rows alone keep one step in flight."""
    engine = llm.engine
    assert engine.cfg.async_scheduling
    engine.add_request("free", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    assert engine._inflight is not None
    engine.add_request("json", [5, 6, 7], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
        regex="[a-z]+")))
    engine.step()
    assert engine._inflight is None
    while engine.has_unfinished_requests():
        engine.step()


def test_structured_bench_smoke(tmp_path):
    from bench import structured_bench

    out = tmp_path / "structured.json"
    res = structured_bench.main(["--smoke", "--batches", "2", "--modes", "free,mixed", "--out", str(out)])
    assert [r["mode"] for r in res["rows"]] == ["free", "mixed"] and json.loads(out.read_text())["rows"]
    assert all(r["status"] == "ok" and r["every_row_decoded"] for r in res["rows"])
    assert res["rows"][0]["mask_calls"] == 0 and res["rows"][1]["mask_calls"] == res["rows"][1]["steps"]

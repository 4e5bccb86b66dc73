import math
import random

import pytest
import torch

from dsv2.engine.params import SamplingParams
from dsv2.engine.sampler import (
    Detokenizer,
    RowState,
    Sampler,
    check_stop,
    make_generator,
    reference_process,
)
from dsv2.tokenizer import train_bpe

from .numerics import tol

INF = float("inf")


def row(prompt=(), output=(), eos_id=None, device="cpu", **params) -> RowState:
    p = SamplingParams(**params)
    return RowState(p, list(prompt), list(output), make_generator(p.seed, device), eos_id)


def support(x: torch.Tensor) -> set[int]:
    return set(torch.isfinite(x).nonzero().flatten().tolist())


# --- SamplingParams ---------------------------------------------------------------------------


def test_params_defaults_and_normalization():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.logprobs) == (1, 1.0, 1.0, 0, 16, None)
    assert p.stop == [] and p.stop_token_ids == [] and not p.greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(logprobs=0).logprobs == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2.0), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(repetition_penalty=1e-40), "repetition_penalty"),  # logits / it overflow to inf
        (dict(temperature=1e-40), "temperature"),
        (dict(top_k=2**63), "top_k"),  # past int64
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-2.01), "frequency_penalty"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=17), "min_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(logprobs=-1), "logprobs"),
        (dict(seed=1.5), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(stop=["ok", 3]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(ignore_eos=1), "ignore_eos"),
    ],
)
def test_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_boundaries_accepted():
    SamplingParams(temperature=0, top_p=1, min_p=1, presence_penalty=-2, frequency_penalty=2, logprobs=20,
                   max_tokens=1, min_tokens=1, repetition_penalty=0.01, seed=-5, top_k=1)


# --- Sampler: processing ----------------------------------------------------------------------


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    out = Sampler()(logits, [row(temperature=0) for _ in range(5)])
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.top_logprobs == [None] * 5
    torch.testing.assert_close(out.logprobs, logits.log_softmax(-1).amax(-1))


def test_greedy_ignores_filters_and_temperature_but_not_penalties():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    assert Sampler()(logits, [row(temperature=0, top_k=1, top_p=0.1, min_p=0.9)]).token_ids.item() == 0
    # token 0 was seen: 3.0 / 1.2 = 2.5 < 2.9
    assert Sampler()(logits, [row(prompt=[0], temperature=0, repetition_penalty=1.2)]).token_ids.item() == 1


def _chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    return float(((observed - expected) ** 2 / expected).sum())


def test_temperature_matches_softmax_frequencies():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 40_000
    sampler = Sampler(generator=torch.Generator().manual_seed(0))
    for t in (0.5, 1.0, 2.0):
        samples = sampler(logits.expand(n, -1), [row(temperature=t)] * n).token_ids
        # 4 degrees of freedom: P(chi2 > 25) < 1e-4
        assert _chi_square(samples, (logits / t).softmax(0)) < 25
        other = 2.0 if t != 2.0 else 0.5
        assert _chi_square(samples, (logits / other).softmax(0)) > 200


def test_top_k_support():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.7, 3.0]])
    for k, expected in [(1, {5}), (2, {5, 1}), (3, {5, 1, 3}), (6, set(range(6))), (100, set(range(6))),
                        (0, set(range(6)))]:
        x = Sampler().process(logits, [row(top_k=k)])[0]
        assert support(x) == expected, k


def test_top_p_support():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log()[None]
    # a token stays while the tokens above it hold less than p
    for p, expected in [(0.4, {0}), (0.5, {0}), (0.6, {0, 1}), (0.75, {0, 1}), (0.8, {0, 1, 2}),
                        (0.95, {0, 1, 2, 3}), (0.99, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})]:
        x = Sampler().process(logits, [row(top_p=p)])[0]
        assert support(x) == expected, p


def test_top_p_after_top_k_renormalizes():
    logits = torch.tensor([0.5, 0.25, 0.15, 0.1]).log()[None]
    # top-2 renormalized: 2/3, 1/3; top_p 0.6 keeps only the first
    x = Sampler().process(logits, [row(top_k=2, top_p=0.6)])[0]
    assert support(x) == {0}


def test_min_p_support():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log()[None]
    for m, expected in [(0.0, set(range(5))), (0.2, {0, 1, 2, 3}), (0.3, {0, 1, 2}), (0.5, {0, 1}),
                        (0.8, {0}), (1.0, {0})]:
        x = Sampler().process(logits, [row(min_p=m)])[0]
        assert support(x) == expected, m


def test_filters_apply_after_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    # T=1: probs .665 .245 .090 -> min_p .3 drops token 2 only; T=0.5: .867 .117 .016 -> drops 1 and 2
    assert support(Sampler().process(logits, [row(min_p=0.3)])[0]) == {0, 1}
    assert support(Sampler().process(logits, [row(min_p=0.3, temperature=0.5)])[0]) == {0}


def test_draws_stay_in_support():
    torch.manual_seed(0)
    logits = torch.randn(1, 40)
    rows = [row(top_k=5, top_p=0.8, min_p=0.05, seed=i) for i in range(300)]
    allowed = support(Sampler().process(logits, rows[:1])[0])
    out = Sampler()(logits.expand(300, -1), rows)
    assert set(out.token_ids.tolist()) <= allowed and len(allowed) > 1
    assert len(set(out.token_ids.tolist())) > 1


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -0.5]])
    r = row(prompt=[0, 1], output=[2, 2], repetition_penalty=1.2, temperature=0)
    x = Sampler().process(logits, [r])[0]
    # seen: positive logits divided, negative multiplied; token 3 and 4 unseen
    expected = torch.tensor([2.0 / 1.2, -2.0 * 1.2, 1.0 / 1.2, 0.5, -0.5])
    torch.testing.assert_close(x, expected)


def test_presence_and_frequency_hand_computed():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -0.5]])
    # the prompt's tokens get no presence/frequency penalty; output counts: 1 -> 3, 2 -> 1
    r = row(prompt=[0, 4], output=[1, 2, 1, 1], presence_penalty=0.3, frequency_penalty=0.5, temperature=0)
    x = Sampler().process(logits, [r])[0]
    expected = torch.tensor([2.0, -2.0 - 3 * 0.5 - 0.3, 1.0 - 0.5 - 0.3, 0.5, -0.5])
    torch.testing.assert_close(x, expected)
    # negative values reward repetition
    r = row(output=[3], presence_penalty=-1.0, frequency_penalty=-0.5, temperature=0)
    assert Sampler().process(logits, [r])[0, 3].item() == pytest.approx(0.5 + 1.0 + 0.5)


def test_all_penalties_together_in_vllm_order():
    logits = torch.tensor([[2.0, -1.0]])
    r = row(prompt=[1], output=[0, 0], repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5,
            temperature=0)
    x = Sampler().process(logits, [r])[0]
    # repetition first (2 / 2 = 1), then frequency and presence: 1 - 0.5 - 0.5 = 0
    torch.testing.assert_close(x, torch.tensor([0.0, -2.0]))


def test_min_tokens_masks_eos_and_stop_tokens():
    eos = 7
    logits = torch.zeros(1, 10)
    logits[0, eos] = 5.0
    logits[0, 3] = 4.0
    logits[0, 1] = 3.0
    sampler = Sampler()

    def pick(output_len, **kw):
        return sampler(logits, [row(output=[1] * output_len, eos_id=eos, temperature=0, **kw)]).token_ids.item()

    assert pick(0, min_tokens=2) == 3
    assert pick(1, min_tokens=2, stop_token_ids=[3]) == 1
    assert pick(2, min_tokens=2) == eos
    assert pick(0) == eos
    # with ignore_eos EOS ends nothing, so min_tokens leaves it alone
    assert pick(0, min_tokens=2, ignore_eos=True) == eos
    # sampled rows too
    r = row(output=[], eos_id=eos, min_tokens=1, seed=0)
    assert not math.isfinite(sampler.process(logits, [r])[0, eos].item())


def test_vectorized_matches_reference_twin():
    rng = random.Random(0)
    torch.manual_seed(0)
    vocab = 64
    rows = []
    for i in range(40):
        rows.append(row(
            prompt=[rng.randrange(vocab) for _ in range(rng.randrange(0, 12))],
            output=[rng.randrange(vocab) for _ in range(rng.randrange(0, 12))],
            eos_id=rng.choice([None, 5]),
            temperature=rng.choice([0, 0.3, 1.0, 1.7]),
            top_k=rng.choice([0, 1, 3, 20, 100]),
            top_p=rng.choice([1.0, 0.95, 0.5, 0.1]),
            min_p=rng.choice([0.0, 0.05, 0.3]),
            repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
            presence_penalty=rng.choice([0.0, 0.7, -0.4]),
            frequency_penalty=rng.choice([0.0, 0.2, -1.0]),
            min_tokens=rng.choice([0, 4]),
            stop_token_ids=rng.choice([[], [9, 10]]),
        ))
    logits = torch.randn(len(rows), vocab) * 3
    assert_process_matches_reference(logits, rows)


def test_process_leaves_input_alone():
    logits = torch.randn(2, 20)
    before = logits.clone()
    Sampler()(logits, [row(output=[1, 2], repetition_penalty=1.5, top_k=3, temperature=0.5, seed=1),
                       row(min_tokens=3, eos_id=0, temperature=0)])
    assert torch.equal(logits, before)


# --- Sampler: randomness ----------------------------------------------------------------------


def _generate(sampler, steps, logits_per_step, rows):
    """`steps` draws for a batch whose outputs grow as they go; the outputs."""
    for step in range(steps):
        out = sampler(logits_per_step[step][: len(rows)], rows)
        for r, t in zip(rows, out.token_ids.tolist()):
            r.output_ids.append(t)
    return [r.output_ids for r in rows]


def test_seeded_rows_reproducible_and_batch_independent():
    torch.manual_seed(0)
    steps, vocab = 30, 50
    logits = [torch.randn(6, vocab) for _ in range(steps)]
    # the seeded request always sits in row 0 and sees the same logits
    for step in logits:
        step[1:] = torch.randn(5, vocab)

    def alone():
        return [row(seed=1234, top_p=0.9, repetition_penalty=1.1)]

    def crowded():
        return alone() + [row(seed=99), row(temperature=0.7), row(temperature=0), row(top_k=2),
                          row(seed=5, min_p=0.1)]

    reference = _generate(Sampler(), steps, logits, alone())[0]
    assert _generate(Sampler(), steps, logits, alone())[0] == reference
    torch.manual_seed(1)  # the shared generator moves; the seeded row must not care
    assert _generate(Sampler(), steps, logits, crowded())[0] == reference
    # other companions' logits, and a seeded shared generator
    other = [torch.cat([s[:1], torch.randn(5, vocab)]) for s in logits]
    assert _generate(Sampler(torch.Generator().manual_seed(7)), steps, other, crowded())[0] == reference
    other_seed = _generate(Sampler(), steps, logits, [row(seed=4321, top_p=0.9, repetition_penalty=1.1)])
    assert other_seed[0] != reference


def test_seeded_request_in_a_different_row_position():
    torch.manual_seed(0)
    vocab = 30
    logits = torch.randn(vocab)
    first = Sampler()(logits[None], [row(seed=3)]).token_ids.item()
    batch = torch.stack([torch.randn(vocab), torch.randn(vocab), logits])
    out = Sampler()(batch, [row(seed=8), row(), row(seed=3)])
    assert out.token_ids[2].item() == first


def test_unseeded_rows_use_the_samplers_generator():
    logits = torch.zeros(8, 1000)
    a = Sampler(torch.Generator().manual_seed(0))(logits, [row() for _ in range(8)]).token_ids
    b = Sampler(torch.Generator().manual_seed(0))(logits, [row() for _ in range(8)]).token_ids
    c = Sampler(torch.Generator().manual_seed(1))(logits, [row() for _ in range(8)]).token_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_make_generator():
    assert make_generator(None, "cpu") is None
    g1, g2 = make_generator(5, "cpu"), make_generator(5, "cpu")
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


# --- Sampler: logprobs ------------------------------------------------------------------------


def test_logprobs_are_raw_and_top_n_sorted():
    torch.manual_seed(0)
    logits = torch.randn(4, 40) * 2
    rows = [
        row(output=[1, 2], repetition_penalty=1.5, temperature=0.3, logprobs=5, seed=0),
        row(temperature=0, logprobs=0),
        row(top_k=3, logprobs=20, seed=1),
        row(temperature=2.0),
    ]
    out = Sampler()(logits, rows)
    raw = logits.log_softmax(-1)
    expected = raw.gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected)
    assert out.top_logprobs[1] == [] and out.top_logprobs[3] is None
    for i, n in [(0, 5), (2, 20)]:
        top = out.top_logprobs[i]
        assert len(top) == n
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        ids = raw[i].argsort(descending=True)[:n].tolist()
        assert [t for t, _ in top] == ids
        for t, v in top:
            assert v == pytest.approx(raw[i, t].item(), abs=tol(torch.float32, 2**5))  # log-softmax of ~10


def test_logprobs_more_than_vocab():
    out = Sampler()(torch.tensor([[0.0, 1.0, 2.0]]), [row(logprobs=20, temperature=0)])
    assert [t for t, _ in out.top_logprobs[0]] == [2, 1, 0]


# --- check_stop -------------------------------------------------------------------------------


def test_check_stop():
    eos = 2
    p = SamplingParams(max_tokens=5, stop_token_ids=[9])
    assert check_stop(p, 4, 1, eos) is None
    assert check_stop(p, eos, 1, eos) == "stop"
    assert check_stop(p, 9, 3, eos) == "stop"
    assert check_stop(p, 4, 5, eos) == "length"
    assert check_stop(p, eos, 5, eos) == "stop"  # the model did end
    assert check_stop(p, eos, 1, None) is None
    ignore = SamplingParams(max_tokens=5, ignore_eos=True, stop_token_ids=[9])
    assert check_stop(ignore, eos, 1, eos) is None
    assert check_stop(ignore, 9, 1, eos) == "stop"
    minimum = SamplingParams(max_tokens=5, min_tokens=2)
    assert check_stop(minimum, eos, 2, eos) is None
    assert check_stop(minimum, eos, 3, eos) == "stop"


# --- Detokenizer ------------------------------------------------------------------------------


def corpus() -> list[str]:
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog STOP stop end ### token text café 世界 你好 😀 🚀".split()
    return [" ".join(rng.choice(words) for _ in range(20)) for _ in range(100)]


@pytest.fixture(scope="module")
def tok():
    # A small vocabulary, so CJK characters and emoji stay split across byte-level tokens.
    return train_bpe(corpus(), vocab_size=300)


def detok_run(tok, ids, **params):
    """Push ids until the request ends; (chunks, stopped_by, detokenizer). Checks on the way that the
    text already out is never retracted: it is always a prefix of the final text."""
    p = SamplingParams(max_tokens=max(len(ids), 1), **params)
    d = Detokenizer(tok, p, tok.eos_token_id)
    chunks, stopped_by = [], None
    for n, t in enumerate(ids, 1):
        text, stopped_by = d.push(t)
        chunks.append(text)
        if stopped_by or check_stop(p, t, n, tok.eos_token_id):
            break
    chunks.append(d.flush())
    final = "".join(chunks)
    for i in range(len(chunks)):
        assert final.startswith("".join(chunks[:i]))
    assert d.text == final
    return chunks, d.stopped_by, d


def cut(text: str, stops: list[str], include: bool = False) -> tuple[str, str | None]:
    """The reference: the text cut at the stop string completed first."""
    best = None
    for s in stops:
        i = text.find(s)
        if i != -1 and (best is None or (i + len(s), i) < (best[1] + len(best[0]), best[1])):
            best = (s, i)
    if best is None:
        return text, None
    s, i = best
    return text[: i + len(s) if include else i], s


def test_detokenizer_without_stops_is_the_decode(tok):
    text = "the quick 世界 fox 😀 café"
    ids = tok.encode(text)
    chunks, stopped, d = detok_run(tok, ids)
    assert "".join(chunks) == text and stopped is None and d.text == text


def test_stop_string_spanning_tokens(tok):
    text = "the quick brown fox jumps over the lazy dog"
    ids = tok.encode(text)
    stop = "n fox j"
    pieces = [tok.decode([i]) for i in ids]
    assert not any(stop in p for p in pieces)  # only a span of tokens holds it
    chunks, stopped, _ = detok_run(tok, ids, stop=[stop])
    assert "".join(chunks) == "the quick brow" and stopped == stop
    chunks, stopped, _ = detok_run(tok, ids, stop=[stop], include_stop_str_in_output=True)
    assert "".join(chunks) == "the quick brown fox j" and stopped == stop


def test_multiple_stop_strings_first_completed_wins(tok):
    text = "the quick brown fox jumps over the lazy dog"
    ids = tok.encode(text)
    for stops in (["lazy", "fox"], ["fox", "lazy"]):
        chunks, stopped, _ = detok_run(tok, ids, stop=stops)
        assert "".join(chunks) == "the quick brown " and stopped == "fox"
    # "own fox" starts first, but "fox" is complete at the same point and "brown" before both
    chunks, stopped, _ = detok_run(tok, ids, stop=["own fox", "brown"])
    assert "".join(chunks) == "the quick " and stopped == "brown"
    # the same end: the earlier start (the longer string) wins
    chunks, stopped, _ = detok_run(tok, ids, stop=["fox", "n fox"])
    assert "".join(chunks) == "the quick brow" and stopped == "n fox"


def test_partial_stop_string_is_held_back(tok):
    ids = tok.encode("the quick STO")
    d = Detokenizer(tok, SamplingParams(stop=["STOP"]), tok.eos_token_id)
    out = "".join(d.push(t)[0] for t in ids)
    assert "quick" in out and not out.endswith(("S", "ST", "STO"))  # held: it could still be STOP
    assert d.push(tok.encode("P")[0]) == ("", "STOP")
    assert d.flush() == ""
    assert d.text == "the quick "

    # not a stop after all: released once disambiguated, or at flush
    d = Detokenizer(tok, SamplingParams(stop=["STOP"]), tok.eos_token_id)
    out = "".join(d.push(t)[0] for t in tok.encode("the quick STOx fox"))
    assert out + d.flush() == "the quick STOx fox"
    # with the stop string kept in the output nothing needs holding back
    d = Detokenizer(tok, SamplingParams(stop=["STOP"], include_stop_str_in_output=True), tok.eos_token_id)
    assert "".join(d.push(t)[0] for t in ids) == "the quick STO"


def test_held_back_text_never_holds_a_partial_stop(tok):
    stops = ["STOP", "###"]
    d = Detokenizer(tok, SamplingParams(stop=stops), tok.eos_token_id)
    out = ""
    for t in tok.encode("the ## fox ST dog STO lazy #"):
        out += d.push(t)[0]
        for s in stops:
            for k in range(1, len(s)):
                # text already out that ends in a stop string's beginning would be unsafe: more
                # tokens may complete it; the detokenizer must still hold it
                if d.text.endswith(s[:k]):
                    assert not out.endswith(s[:k])
    assert out + d.flush() == "the ## fox ST dog STO lazy #"


def test_stop_strings_with_split_utf8(tok):
    text = "the fox 你好世界 dog 😀🚀 end"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # characters do split across tokens
    for stop, expected in [("世界", "the fox 你好"), ("😀", "the fox 你好世界 dog "), ("好世", "the fox 你"),
                           ("🚀 e", "the fox 你好世界 dog 😀")]:
        chunks, stopped, _ = detok_run(tok, ids, stop=[stop])
        assert "".join(chunks) == expected and stopped == stop
        assert not any("\ufffd" in c for c in chunks)
        chunks, _, _ = detok_run(tok, ids, stop=[stop], include_stop_str_in_output=True)
        assert "".join(chunks) == expected + stop


def test_incomplete_character_at_the_end_flushes_as_replacement(tok):
    ids = tok.encode("dog 😀")
    chunks, _, _ = detok_run(tok, ids[:-1])
    assert "".join(chunks) == tok.decode(ids[:-1]) and chunks[-1].endswith("\ufffd")


def test_stop_string_found_at_flush(tok):
    # " " shares a token with half of 😀, so the decoder holds it back until the character is done,
    # or until flush when the request ends first
    ids = tok.encode("dog 😀")
    assert tok.decode(ids[3:4]).startswith(" ") and tok.decode(ids[3:4]).endswith("\ufffd")
    chunks, stopped, _ = detok_run(tok, ids, stop=["g "])
    assert "".join(chunks) == "do" and stopped == "g "
    chunks, stopped, _ = detok_run(tok, ids[:4], stop=["g "])
    assert chunks[-1] == "" and "".join(chunks) == "do" and stopped == "g "


def test_stop_token_text_left_out_unless_included(tok):
    eos = tok.eos_token_id
    ids = tok.encode("the fox") + [eos]
    for skip in (True, False):
        chunks, stopped, _ = detok_run(tok, ids, skip_special_tokens=skip)
        assert "".join(chunks) == "the fox" and stopped is None
    chunks, _, _ = detok_run(tok, ids, skip_special_tokens=False, include_stop_str_in_output=True)
    assert "".join(chunks) == "the fox" + tok.eos_token
    # with ignore_eos the EOS token is ordinary text
    chunks, _, _ = detok_run(tok, ids + tok.encode(" dog"), skip_special_tokens=False, ignore_eos=True)
    assert "".join(chunks) == "the fox" + tok.eos_token + " dog"
    # a stop_token_id's text is left out the same way
    dog = tok.encode(" dog")
    chunks, _, _ = detok_run(tok, tok.encode("the fox") + dog, stop_token_ids=[dog[-1]])
    assert "".join(chunks) == "the fox" + tok.decode(dog[:-1])


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok.encode("the fox jumps over the fox")
    first_fox = next(n for n in range(1, len(ids) + 1) if "fox" in tok.decode(ids[:n]))
    chunks, stopped, _ = detok_run(tok, ids, stop=["fox"], min_tokens=first_fox)
    assert "".join(chunks) == "the fox jumps over the " and stopped == "fox"
    chunks, _, _ = detok_run(tok, ids, stop=["fox"], min_tokens=first_fox - 1)
    assert "".join(chunks) == "the "


def test_push_after_finish_raises(tok):
    d = Detokenizer(tok, SamplingParams(stop=["fox"]), tok.eos_token_id)
    for t in tok.encode("the fox"):
        _, stopped = d.push(t)
    assert stopped == "fox"
    with pytest.raises(RuntimeError):
        d.push(0)
    d = Detokenizer(tok, SamplingParams(), tok.eos_token_id)
    d.push(tok.eos_token_id)
    with pytest.raises(RuntimeError):
        d.push(0)


def test_detokenizer_random_against_cut_decode(tok):
    rng = random.Random(0)
    alphabet = list("abc ST#") + ["世", "界", "😀", "é"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        ids = tok.encode(text)
        stops = []
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(text))
            stops.append(text[i : i + rng.randrange(1, 5)] if rng.random() < 0.7 else rng.choice(["##", "zz", "é世"]))
        include = rng.random() < 0.5
        skip = rng.random() < 0.5
        chunks, stopped, _ = detok_run(tok, ids, stop=stops, include_stop_str_in_output=include,
                                       skip_special_tokens=skip)
        expected, expected_stop = cut(tok.decode(ids), stops, include)
        assert "".join(chunks) == expected, (text, stops, include)
        assert stopped == expected_stop


@pytest.mark.gpu
def test_seeded_batch_independence_on_cuda():
    torch.manual_seed(0)
    vocab = 32000
    logits = torch.randn(8, vocab, device="cuda") * 3
    alone = Sampler()(logits[:1], [row(seed=11, top_p=0.9, device="cuda")]).token_ids.item()
    crowd_rows = [row(seed=11, top_p=0.9, device="cuda")] + [row(seed=i, device="cuda") for i in range(3)]
    crowd_rows += [row(temperature=0.5, device="cuda") for _ in range(4)]
    assert Sampler()(logits, crowd_rows).token_ids[0].item() == alone
    r = [row(output=[1, 2, 3], repetition_penalty=1.3, frequency_penalty=0.5, top_k=50, top_p=0.8,
             min_p=0.02, seed=1, device="cuda") for _ in range(8)]
    fast = Sampler().process(logits, r)
    for i in range(8):
        slow = reference_process(logits[i].cpu(), RowState(r[i].params, r[i].prompt_ids, r[i].output_ids))
        assert torch.equal(torch.isfinite(fast[i]).cpu(), torch.isfinite(slow))


def assert_process_matches_reference(logits, rows):
    """The batched Sampler.process against the loop-based reference, row by row."""
    fast = Sampler().process(logits, rows)
    for i, r in enumerate(rows):
        slow = reference_process(logits[i], r)
        # which tokens survive is a discrete outcome: it changes only when a cumulative probability
        # lands within rounding of top_p, which these draws never do
        assert torch.equal(torch.isfinite(fast[i]), torch.isfinite(slow)), i
        # the batched penalties and scalings in another order: a few ulps of logits of ~10
        torch.testing.assert_close(fast[i], slow, rtol=tol(torch.float32, 2**4), atol=tol(torch.float32, 2**6))

"""Sliding-window perplexity against hand computations, and needle in a haystack: the haystack's
length and needle placement, scoring with a model forced right or wrong, the heatmap (CPU, a tiny
random model with the bundled tokenizer)."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from dsv2.cli import bundled_model_dir
from dsv2.eval.lm import EvalModel
from dsv2.eval.niah import default_filler, make_haystack, make_needle, run_niah
from dsv2.eval.perplexity import run_perplexity, windows

from .numerics import tol


TEXT = ("The committee met on a grey Tuesday to settle the budget. Nobody agreed on the numbers, "
        "so the chair proposed a recess, and the recess became lunch. Über-long words, naïve cafés "
        "and 東京 keep the byte count honest.\n") * 3


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return EvalModel(tiny_model_dir, device="cpu", backend="reference")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@torch.no_grad()
def nll_window_minus_one(lm: EvalModel, tokens: list[int], window: int) -> float:
    """Summed NLL of tokens[1:] when each token sees at most window - 1 tokens before it: one
    causal pass over the first window, then every later token's own context, stacked."""
    head = F.log_softmax(lm.model(torch.tensor([tokens[:window]]))[0].float(), dim=-1)
    total = -head[:-1].gather(1, torch.tensor(tokens[1:window])[:, None]).sum().item()
    contexts = torch.tensor([tokens[t - window + 1:t] for t in range(window, len(tokens))])
    tail = F.log_softmax(lm.model(contexts)[:, -1].float(), dim=-1)
    return total - tail.gather(1, torch.tensor(tokens[window:])[:, None]).sum().item()


# --- perplexity --------------------------------------------------------------------------------

def test_windows_score_every_target_once():
    for n, w, s in [(10, 4, 2), (10, 4, 1), (10, 4, 3), (3, 8, 4), (17, 5, 4), (2, 2, 1)]:
        scored = [t for _, end, first in windows(n, w, s) for t in range(first, end)]
        assert scored == list(range(1, n)), (n, w, s)
        for begin, end, first in windows(n, w, s):
            # full windows past the first; each target sees at least window - stride tokens
            assert end - begin == min(w, n) and first - begin >= min(w - s, first)
    with pytest.raises(ValueError):
        windows(10, 4, 4)  # the first target of each window would have no context


def test_perplexity_in_one_window_is_the_full_context_nll(lm, text_file):
    tokens = lm.tokenizer.encode(TEXT)
    assert len(tokens) < lm.max_len
    with torch.no_grad():
        logp = F.log_softmax(lm.model(torch.tensor([tokens]))[0].float(), dim=-1)
    nll = -logp[:-1].gather(1, torch.tensor(tokens[1:])[:, None]).mean().item()

    m = run_perplexity(lm, text_file)["metrics"]
    assert m["tokens"] == len(tokens) - 1
    assert m["nll_per_token"] == pytest.approx(nll, rel=tol(torch.float32, 2**7))
    assert m["perplexity"] == pytest.approx(math.exp(nll), rel=tol(torch.float32, 2**7))
    # the scored text is everything after the first token
    first = len(lm.tokenizer.decode(tokens[:1]).encode("utf-8"))
    assert m["bytes"] == len(TEXT.encode("utf-8")) - first
    assert m["bits_per_byte"] == pytest.approx(m["nll_per_token"] * m["tokens"] / m["bytes"] / math.log(2))


def test_strided_windows_give_each_token_the_context_the_window_allows(lm, text_file):
    tokens = lm.tokenizer.encode(TEXT)
    full = run_perplexity(lm, text_file)["metrics"]
    window = 24
    # stride 1: every token past the first window sees exactly window - 1 tokens before it
    r = run_perplexity(lm, text_file, window=window, stride=1)
    assert r["metrics"]["tokens"] == len(tokens) - 1
    want = nll_window_minus_one(lm, tokens, window)
    assert r["metrics"]["nll_per_token"] == pytest.approx(want / (len(tokens) - 1), rel=tol(torch.float32, 2**7))

    for stride in (window - 1, window // 2):
        m = run_perplexity(lm, text_file, window=window, stride=stride)["metrics"]
        assert m["tokens"] == len(tokens) - 1 and m["bytes"] == full["bytes"]
        # a near-uniform random model barely uses its context: shorter ones change little
        assert m["perplexity"] == pytest.approx(full["perplexity"], rel=0.02)
    # ...but they do change it, so the comparisons above are not vacuous
    assert m["nll_per_token"] != full["nll_per_token"]


def test_perplexity_limit_caps_the_tokens_scored(lm, text_file):
    m = run_perplexity(lm, text_file, window=32, limit=50)["metrics"]
    assert m["tokens"] == 50
    assert m["bits_per_byte"] == pytest.approx(m["nll_per_token"] * 50 / m["bytes"] / math.log(2))


# --- needle in a haystack ----------------------------------------------------------------------

@pytest.mark.parametrize("length", [128, 240])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_haystack_has_the_length_and_the_needle_at_its_depth(lm, length, depth):
    needle, question, answer = make_needle(random.Random(int(depth * 4) + length))
    ids = make_haystack(lm.tokenizer, default_filler(), length, depth, needle, question)
    assert 0.95 * length <= len(ids) <= length
    text = lm.tokenizer.decode(ids)
    assert text.count(needle) == 1 and text.count(answer) == 1
    # depth as the needle's place in the text before the question
    ratio = text.index(needle) / text.rindex(question)
    assert abs(ratio - depth) < 0.12, ratio


def test_haystack_repeats_a_short_filler():
    from dsv2.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(bundled_model_dir())
    ids = make_haystack(tok, "A short sentence.", 1000, 0.5, "The special magic number of Oslo is 12345.",
                        "What is the special magic number of Oslo?")
    assert 950 <= len(ids) <= 1000


def _forced(lm: EvalModel, right: bool):
    def generate(prompts, max_new_tokens, stop=None, temperature=0.0, n=1, seed=None):
        out = []
        for p in prompts:
            value = re.search(r"The special magic \w+ of \w+ is (\w+)\.", lm.tokenizer.decode(p)).group(1)
            out.append([f" {value}." if right else " I do not know."])
        return out
    return generate


def test_niah_scores_a_right_model_one_and_a_wrong_model_zero(lm, monkeypatch, tmp_path):
    lengths, depths = [96, 160, 224], [0.0, 0.5, 1.0]
    monkeypatch.setattr(lm, "generate", _forced(lm, right=True))
    png = tmp_path / "plots" / "niah.png"
    r = run_niah(lm, lengths=lengths, depths=depths, trials=2, heatmap=png)
    assert r["task"] == "niah" and r["metrics"]["accuracy"] == 1.0
    assert r["grid"] == {"lengths": lengths, "depths": depths, "accuracy": [[1.0] * 3] * 3}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    monkeypatch.setattr(lm, "generate", _forced(lm, right=False))
    r = run_niah(lm, lengths=lengths, depths=depths, trials=2)
    assert r["metrics"]["accuracy"] == 0.0 and r["grid"]["accuracy"] == [[0.0] * 3] * 3


def test_niah_defaults_fit_the_context_and_are_deterministic(lm, monkeypatch):
    monkeypatch.setattr(lm, "generate", _forced(lm, right=True))
    a = run_niah(lm, depths=[0.5], seed=3)
    # 256 + 16 answer tokens do not fit a 256-token model: the longest context that does
    assert a["grid"]["lengths"] == [lm.max_len - 16]
    assert a["samples"] == run_niah(lm, depths=[0.5], seed=3)["samples"]
    assert a["samples"] != run_niah(lm, depths=[0.5], seed=4)["samples"]


def test_niah_runs_the_real_model(lm):
    r = run_niah(lm, lengths=[64], depths=[0.0, 1.0], max_new_tokens=4)
    assert 0.0 <= r["metrics"]["accuracy"] <= 1.0 and len(r["samples"]) == 2


def test_default_lengths_reach_the_whole_window():
    from dsv2.eval.niah import default_lengths

    assert default_lengths(4096, 16) == [256, 512, 1024, 2048, 4080]
    assert default_lengths(2064, 16) == [256, 512, 1024, 2048]

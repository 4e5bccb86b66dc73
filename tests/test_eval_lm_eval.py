"""The lm-evaluation-harness adapter (CPU, a tiny random model speaking the bundled tokenizer):
its scores against EvalModel and hand computations, stop strings, and a whole lm_eval run on a local
multiple-choice task whose accuracy is recomputed by hand. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

# datasets reads these when imported; set them before lm_eval (which imports it) can be
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'dsv2[eval]')")

from dsv2.eval.lm import EvalModel  # noqa: E402 (after the importorskip)
from dsv2.eval.lm_eval_adapter import DSV2LM, register  # noqa: E402

from .numerics import tol  # noqa: E402

# a sum of log-probs of ~10 from another op sequence: a few ulps of each term
PER_TOKEN = tol(torch.float32, 2**7)



def req(*args):
    """The part of an lm_eval Instance the adapter reads."""
    return SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def eval_model(tiny_model_dir):
    return EvalModel(tiny_model_dir, device="cpu", backend="reference", batch_size=4)


@pytest.fixture(scope="module")
def lm(eval_model):
    return DSV2LM.from_eval_model(eval_model)


def test_registered_and_built_from_model_args(tiny_model_dir):
    from lm_eval.api.registry import get_model

    assert get_model("dsv2") is register() is DSV2LM
    # lm_eval hands model_args over as strings (or what its parser makes of them)
    built = get_model("dsv2").create_from_arg_string(
        f"pretrained={tiny_model_dir},device=cpu,dtype=float32,backend=reference", {"batch_size": "auto", "device": None})
    assert built.model.backend == "reference" and built.model.batch_size == 32
    assert built.max_length == 256


def test_pairs_are_encoded_as_lm_evals_hf_model_does(lm):
    tok = lm.tokenizer
    ctx, cont = lm.encode_pair("Question: what is two plus two?\nAnswer: ", "4")
    assert ctx == tok.encode("Question: what is two plus two?\nAnswer:", add_bos=True)  # the space moved
    assert ctx + cont == tok.encode("Question: what is two plus two?\nAnswer: 4", add_bos=True)
    assert lm.encode_pair("", "hello there") == ([tok.bos_token_id], tok.encode("hello there"))


def test_loglikelihood_equals_eval_model_on_the_same_ids(lm, eval_model):
    pairs = [("The quick brown", " fox"), ("Answer: ", "yes"), ("", "Once upon a time"),
             ("def add(a, b):\n    return", " a + b")]
    got = lm.loglikelihood([req(c, x) for c, x in pairs])
    want = eval_model.loglikelihood([lm.encode_pair(c, x) for c, x in pairs])
    assert len(got) == len(pairs)
    for (lp, greedy), (lp_want, greedy_want) in zip(got, want):
        assert lp == pytest.approx(lp_want, abs=4 * PER_TOKEN) and greedy == greedy_want
        assert lp < 0


def _hand_logprob(model, tokens: list[int]) -> float:
    """log p(tokens[1:] | tokens[:1]) from one forward pass."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([tokens])).float(), dim=-1)[0]
    return sum(logp[t, tokens[t + 1]].item() for t in range(len(tokens) - 1))


def test_loglikelihood_rolling_equals_a_hand_computation(lm, eval_model):
    text = "To be, or not to be, that is the question."
    ids = lm.tokenizer.encode(text)
    (got,) = lm.loglikelihood_rolling([req(text)])
    assert got == pytest.approx(_hand_logprob(eval_model.model, [lm.tokenizer.bos_token_id] + ids),
                                abs=len(ids) * PER_TOKEN)


def test_loglikelihood_rolling_predicts_every_token_once_across_windows(lm, eval_model):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    ids = lm.tokenizer.encode(text)
    width = lm.rolling_width
    assert width < len(ids) < 2 * width  # two windows
    # window 1: BOS + the first `width` tokens; window 2: the token before it + the rest
    want = (_hand_logprob(eval_model.model, [lm.tokenizer.bos_token_id] + ids[:width])
            + _hand_logprob(eval_model.model, ids[width - 1:]))
    assert lm.loglikelihood_rolling([req(text), req("")]) == [pytest.approx(want, abs=len(ids) * PER_TOKEN), 0.0]


def test_generate_until_stops_at_until(lm):
    prompt = "Once upon a time"
    (free,) = lm.generate_until([req(prompt, {"until": [], "max_gen_toks": 24, "do_sample": False})])
    assert len(free) >= 6, "the tiny model should write something to cut"
    stop = free[len(free) // 2: len(free) // 2 + 2]
    want = free[: free.find(stop)]
    cut = lm.generate_until([req(prompt, {"until": [stop], "max_gen_toks": 24}),
                             req(prompt, {"until": stop, "max_gen_toks": 24, "temperature": 0.0})])
    assert cut == [want, want]
    assert stop not in cut[0]


# --- a whole lm_eval run on a local task ---------------------------------------------------------

QUESTIONS = [
    {"question": "What colour is the sky on a clear day?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten"], "answer": 1},
    {"question": "Which is a fruit?", "choices": ["carrot", "potato", "apple"], "answer": 2},
    {"question": "What is two plus two?", "choices": ["four", "five"], "answer": 0},
    {"question": "Which animal barks?", "choices": ["cat", "dog", "fish", "bird"], "answer": 1},
]


def test_simple_evaluate_on_a_local_multiple_choice_task(lm, tmp_path):
    from lm_eval.tasks import TaskManager

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # data_files and cache_dir point into tmp_path: the dataset is read locally, nothing is cached in $HOME
    (tasks / "dsv2_tiny_mc.yaml").write_text(f"""\
task: dsv2_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    # include_defaults=False: indexing lm-eval's thousands of bundled tasks takes most of a minute
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["dsv2_tiny_mc"], task_manager=manager, bootstrap_iters=0,
                                  log_samples=False)
    acc = out["results"]["dsv2_tiny_mc"]["acc,none"]

    # by hand: the choice the adapter scores highest (lm-eval's default target delimiter is " ")
    correct = 0
    for q in QUESTIONS:
        scores = [lp for lp, _ in lm.loglikelihood(
            [req(f"Question: {q['question']}\nAnswer:", " " + c) for c in q["choices"]])]
        correct += scores.index(max(scores)) == q["answer"]
    assert acc == pytest.approx(correct / len(QUESTIONS))

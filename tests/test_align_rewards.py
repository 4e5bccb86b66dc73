import json
import operator
import re
import socket
import textwrap
import uuid

import pytest

from dsv2.align import arith, rewards
from dsv2.align.arith import Problem, generate, is_heldout, prompt_rows, sft_rows
from dsv2.align.rewards import code_reward, extract_answer, extract_program, math_reward
from dsv2.sandbox import SandboxLimits, isolation

FAST = SandboxLimits(wall_seconds=2.0, cpu_seconds=2, memory_bytes=512 << 20)
STEP = re.compile(r"(\d+) ([+*-]) (\d+) = (-?\d+)\.")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def needs(*layers):
    """Skip unless this machine's sandbox has at least one of `layers` (as tests/test_sandbox.py)."""
    have = isolation()
    if not set(layers) & set(have):
        pytest.skip(f"no {' or '.join(layers)} here (sandbox layers: {', '.join(have)})")


@pytest.fixture(autouse=True)
def fast_sandbox(monkeypatch):
    monkeypatch.setattr(rewards, "CODE_LIMITS", FAST)


# ---------------------------------------------------------------------------------------------
# arithmetic problems

@pytest.mark.parametrize("level", arith.LEVELS)
def test_generate_is_deterministic_and_a_smaller_n_is_a_prefix(level):
    a = generate(200, seed=3, level=level)
    assert a == generate(200, seed=3, level=level)
    assert a[:50] == generate(50, seed=3, level=level)
    assert a != generate(200, seed=4, level=level)
    assert len({p.question for p in a}) == 200


@pytest.mark.parametrize("level", arith.LEVELS)
def test_train_and_heldout_never_share_a_question(level):
    train = [p for seed in (0, 1) for p in generate(300, "train", seed=seed, level=level)]
    heldout = [p for seed in (0, 1) for p in generate(50, "heldout", seed=seed, level=level)]
    assert not {p.question for p in train} & {p.question for p in heldout}
    assert not any(is_heldout(p.question) for p in train) and all(is_heldout(p.question) for p in heldout)


def check_solution(p: Problem) -> list[tuple[int, str, int, int]]:
    """The solution's steps, after checking that each is right, each starts from the previous
    result and the last one is the stated answer."""
    assert p.solution.endswith(f"The answer is {p.answer}.")
    steps = [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(p.solution)]
    assert steps and p.solution == " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps) + \
        f" The answer is {p.answer}."
    for i, (a, op, b, c) in enumerate(steps):
        assert OPS[op](a, b) == c >= 0, p
        assert i == 0 or a == steps[i - 1][3], p
    assert steps[-1][3] == p.answer and extract_answer(p.solution) == str(p.answer)
    return steps


def test_level_1_is_one_addition_or_subtraction_of_small_numbers():
    for p in generate(500, seed=0, level=1) + generate(100, "heldout", level=1):
        [(a, op, b, _)] = check_solution(p)
        assert op in "+-" and 1 <= a <= 20 and 1 <= b <= 20
        assert all(1 <= int(x) <= 20 for x in re.findall(r"\d+", p.question))


def test_level_2_adds_multiplication_and_two_steps():
    problems = generate(1000, seed=0, level=2)
    kinds = set()
    for p in problems:
        steps = check_solution(p)
        kinds.add(tuple(op for _, op, _, _ in steps))
        assert len(steps) <= 2 and all(a <= 100 and b <= 20 and c <= 120 for a, _, b, c in steps)
        assert all(int(x) <= 20 for x in re.findall(r"\d+", p.question))
    assert {("+",), ("-",), ("*",), ("*", "-"), ("*", "+"), ("+", "-"), ("-", "+")} <= kinds


def test_nouns_agree_with_their_numbers():
    singular = {s for s, _ in arith.ITEMS + arith.CONTAINERS}
    plural = {p for _, p in arith.ITEMS + arith.CONTAINERS}
    assert not singular & plural
    for p in generate(1000, seed=0, level=2):
        for k, noun in re.findall(r"\b(\d+) (?:more )?([a-z]+)", p.question):
            assert noun not in (plural if k == "1" else singular), p.question


def test_impossible_requests_are_value_errors():
    with pytest.raises(ValueError, match="cannot be distinct"):
        generate(arith.space(1), "heldout", level=1)
    with pytest.raises(ValueError, match="split"):
        generate(1, "test")
    with pytest.raises(ValueError, match="level"):
        generate(1, level=3)
    assert generate(0) == []


def test_rows_and_cli(tmp_path, capsys):
    p = Problem("Mia has 12 apples. She buys 7 more apples. How many apples does Mia have now?",
                "12 + 7 = 19. The answer is 19.", 19)
    assert sft_rows([p]) == [{"messages": [{"role": "user", "content": p.question},
                                           {"role": "assistant", "content": p.solution}]}]
    assert prompt_rows([p]) == [{"prompt": p.question, "answer": 19}]

    out = tmp_path / "arith"
    argv = ["--out", str(out), "--train", "30", "--heldout", "7", "--seed", "2", "--level", "2"]
    assert arith.main(argv) == 0
    assert sorted(f.name for f in out.iterdir()) == ["prompts_heldout.jsonl", "prompts_train.jsonl",
                                                     "sft_heldout.jsonl", "sft_train.jsonl"]
    rows = {f.stem: [json.loads(line) for line in f.read_text().splitlines()] for f in out.iterdir()}
    for split, n in (("train", 30), ("heldout", 7)):
        problems = generate(n, split, seed=2, level=2)
        assert rows[f"sft_{split}"] == sft_rows(problems)
        assert rows[f"prompts_{split}"] == prompt_rows(problems)
    assert arith.main(["--out", str(out), "--train", str(arith.space(1))]) == 1
    assert "cannot be distinct" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# answer extraction and the math reward

@pytest.mark.parametrize("text, answer", [
    ("12 + 7 = 19. The answer is 19.", "19"),
    ("The answer is 3. Wait, no. The answer is 4", "4"),              # the last one
    ("the ANSWER is: $1,234.", "1234"),                                # case, colon, $, commas, period
    ("The answer is 19.0.", "19"),
    ("The answer is 2.50", "2.5"),
    ("The answer is -5.", "-5"),
    ("The answer is 7, 8 and 9 are near it. #### 8", "7"),              # before GSM8K's mark
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("#### $1,000", "1000"),
    ("The answer is seven. #### 12 and 13", "12"),                      # a word is no answer
    ("She had 10-3 = 7 left, so 7 apples", "7"),                        # else the last number
    ("x = -3", "-3"),
    ("10-3", "3"),                                                      # a minus after a digit subtracts
    ("maybe 1,234,567 or so", "1234567"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_math_reward():
    sample = {"prompt": "…", "answer": 19}
    assert math_reward("12 + 7 = 19. The answer is 19.", sample) == 1.0
    assert math_reward("12 + 7 = 18. The answer is 18.", sample) == 0.0
    assert math_reward("The answer is 19. The answer is 20.", sample) == 0.0
    assert math_reward("", sample) == 0.0 and math_reward(None, sample) == 0.0
    assert math_reward("The answer is 19.0", {"answer": "19"}) == 1.0
    assert math_reward("#### 1,234", {"answer": 1234.0}) == 1.0
    assert math_reward("The answer is 2.5", {"answer": 2.5}) == 1.0
    assert math_reward("so 72", {"answer": "48 + 24 = 72\n#### 72"}) == 1.0  # GSM8K's answer field


def test_registry():
    assert {"math", "code"} <= set(rewards.names())
    assert rewards.get("math") is math_reward and rewards.get("code") is code_reward
    with pytest.raises(ValueError, match="known: .*code.*math"):
        rewards.get("nope")
    with pytest.raises(ValueError, match="already"):
        rewards.register("math")(math_reward)


# ---------------------------------------------------------------------------------------------
# the code reward

ADD = {"prompt": "def add(a, b):", "entry_point": "add",
       "tests": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


def test_extract_program():
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == \
        "def f():\n    return 1\n"
    assert extract_program("```text\nnot code\n```\n```\nx = 1\n```\n```python\ny = 2\n```") == "x = 1\n"
    assert extract_program("```py\ndef f(): pass") == "def f(): pass"  # stopped inside the block
    assert extract_program("def f(): pass\n") == "def f(): pass\n"


def test_code_reward_passes_a_correct_completion_and_fails_a_wrong_one():
    assert code_reward("Sure:\n```python\ndef add(a, b):\n    return a + b\n```\n", ADD) == 1.0
    assert code_reward("```python\ndef add(a, b):\n    return a - b\n```", ADD) == 0.0
    assert code_reward("def add(a, b):\n    import sys; sys.exit(0)\n", ADD) == 0.0
    assert code_reward("", ADD) == 0.0


def test_code_reward_survives_a_failing_sandbox(monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(rewards, "run_tests", broken)
    assert code_reward("def add(a, b):\n    return a + b\n", ADD) == 0.0


def hostile(program: str, tests: str = "assert True\n") -> float:
    return code_reward(f"```python\n{program}\n```", {"prompt": "", "tests": tests})


@pytest.mark.parametrize("program", ["while True:\n    pass", "x = bytearray(1 << 34)"])
def test_loops_and_huge_allocations_score_zero(program):
    assert hostile(program) == 0.0


def test_a_fork_bomb_scores_zero():
    needs("process-limit")
    assert hostile("import os\nwhile True:\n    os.fork()") == 0.0


def test_writing_outside_the_scratch_directory_scores_zero(tmp_path):
    needs("landlock-fs")
    tmp_path.chmod(0o777)  # so that only the sandbox, not file permissions, stands in the way
    target = tmp_path / f"escape-{uuid.uuid4().hex}.txt"
    program = f"open({str(target)!r}, 'w').write('escaped')"
    assert hostile(program, f"assert open({str(target)!r}).read() == 'escaped'\n") == 0.0
    assert not target.exists()


def test_a_socket_to_the_host_scores_zero():
    needs("net-ns", "landlock-tcp", "seccomp")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        program = f"import socket\nconnection = socket.create_connection(('127.0.0.1', {port}), timeout=1)"
        assert hostile(program, "assert connection\n") == 0.0
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


def test_reading_a_host_file_scores_zero(tmp_path):
    needs("landlock-fs")
    value = uuid.uuid4().hex
    secret = tmp_path / "secret.txt"
    secret.write_text(value)
    secret.chmod(0o644)
    tmp_path.chmod(0o755)
    program = textwrap.dedent(f"""
        def read_secret():
            return open({str(secret)!r}).read()
    """)
    tests = f"def check(candidate):\n    assert candidate() == {value!r}\n"
    # the same tests pass when the value is handed over: only the read stands between it and 1.0
    assert code_reward(f"def read_secret():\n    return {value!r}\n",
                       {"tests": tests, "entry_point": "read_secret"}) == 1.0
    assert code_reward(program, {"tests": tests, "entry_point": "read_secret"}) == 0.0

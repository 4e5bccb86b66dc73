"""Rewards for GRPO and the evaluation harness: `fn(completion, sample) -> float`, by name.

`sample` is the prompt row the completion answers: {"prompt", "answer"} for math,
{"prompt", "tests", "entry_point"} for code. A reward scores what the completion says, never
fails on it: a completion that cannot be read or run scores 0.0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from ..sandbox import SandboxLimits, run_tests

Reward = Callable[[str, dict], float]

# GRPO runs a group of completions per prompt, so a slow one holds up the whole step
CODE_LIMITS = SandboxLimits(wall_seconds=5.0, cpu_seconds=5)

_REGISTRY: dict[str, Reward] = {}

# a minus is a sign only where it cannot be subtraction ("10-3" holds 10 and 3, "x = -3" holds -3)
_NUMBER = r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_ANSWER_IS = re.compile(rf"the answer is\s*:?\s*\$?\s*({_NUMBER})", re.IGNORECASE)
_GSM8K = re.compile(rf"####\s*\$?\s*({_NUMBER})")
_ANY_NUMBER = re.compile(_NUMBER)
# a block runs to its closing fence, or to the end where generation stopped inside it
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def register(name: str) -> Callable[[Reward], Reward]:
    def add(fn: Reward) -> Reward:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn
    return add


def get(name: str) -> Reward:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known: {', '.join(names())}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def _canonical(number: str) -> str | None:
    """One spelling per value: no commas, no trailing zeros, "19.0" -> "19", "-0" -> "0"."""
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer of `text` as a canonical number: the last "The answer is X", else GSM8K's
    "#### X", else the last number; None if it holds no number."""
    for pattern in (_ANSWER_IS, _GSM8K, _ANY_NUMBER):
        found = pattern.findall(text)
        if found:
            return _canonical(found[-1])
    return None


@register("math")
def math_reward(completion: str, sample: dict) -> float:
    """1.0 if the completion's final answer equals sample["answer"] (an int, float or string,
    a GSM8K answer field included) in value."""
    if not completion:
        return 0.0
    want = extract_answer(str(sample["answer"]))
    return float(want is not None and extract_answer(completion) == want)


def extract_program(completion: str) -> str:
    """The first Python (or untagged) fenced block, else the whole completion."""
    for tag, body in _FENCE.findall(completion):
        if tag.lower() in ("", "python", "py", "python3"):
            return body
    return completion


@register("code")
def code_reward(completion: str, sample: dict) -> float:
    """1.0 if the completion's program passes sample["tests"] in the sandbox (HumanEval's form:
    `tests` defines check(candidate), called with sample["entry_point"])."""
    if not completion:
        return 0.0
    tests, entry_point = sample["tests"], sample.get("entry_point")
    try:
        result = run_tests(extract_program(completion), tests, entry_point, CODE_LIMITS)
    except Exception:  # noqa: BLE001 -- a sandbox that cannot start fails the sample, not training
        return 0.0
    return float(result.passed)

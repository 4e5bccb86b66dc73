"""Generated arithmetic word problems with verifiable answers, for SFT and then GRPO on a tiny model.

A tiny model trained on English text cannot do arithmetic yet, so the problems stay small and
regular: operands 1-20, products up to 100, results never negative, a dozen sentence templates,
and solutions in one fixed form ("5 * 3 = 15. 15 - 4 = 11. The answer is 11.") that SFT teaches
and the math reward reads back. Level 1 is one addition or subtraction; level 2 adds
multiplication and two-step problems.

The held-out split is decided by a hash of the question text alone, so a question is on the same
side whatever the seed or the number generated, and evaluation never sees a training question.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import operator
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

HELDOUT_FRACTION = 0.1
SPLITS = ("train", "heldout")
LEVELS = (1, 2)

NAMES = (
    ("Mia", "she"), ("Tom", "he"), ("Emma", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"),
    ("Lily", "she"), ("Ben", "he"), ("Zoe", "she"), ("Sam", "he"), ("Ella", "she"), ("Jack", "he"),
    ("Nora", "she"), ("Leo", "he"), ("Ruby", "she"), ("Max", "he"), ("Anna", "she"), ("Luke", "he"),
    ("Sara", "she"), ("Owen", "he"), ("Grace", "she"), ("Adam", "he"), ("Lucy", "she"), ("Ryan", "he"),
    ("Maya", "she"), ("Eli", "he"), ("Chloe", "she"), ("Dan", "he"), ("Ivy", "she"), ("Omar", "he"),
)
ITEMS = (
    ("apple", "apples"), ("pen", "pens"), ("pencil", "pencils"), ("book", "books"), ("marble", "marbles"),
    ("sticker", "stickers"), ("cookie", "cookies"), ("orange", "oranges"), ("banana", "bananas"),
    ("card", "cards"), ("shell", "shells"), ("stamp", "stamps"), ("balloon", "balloons"),
    ("crayon", "crayons"), ("flower", "flowers"), ("egg", "eggs"), ("cupcake", "cupcakes"),
    ("candy", "candies"), ("cherry", "cherries"), ("peach", "peaches"), ("strawberry", "strawberries"),
    ("toy", "toys"), ("coin", "coins"), ("ribbon", "ribbons"), ("button", "buttons"), ("rock", "rocks"),
    ("feather", "feathers"), ("leaf", "leaves"),
)
CONTAINERS = (
    ("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"), ("bowl", "bowls"),
    ("crate", "crates"), ("pack", "packs"), ("tray", "trays"),
)

_OPERAND = (1, 20)
_FACTOR = (2, 10)  # products stay at or below 100
_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}

# a question, its first number, then (operator, operand) steps applied left to right
Worded = tuple[str, int, list[tuple[str, int]]]


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    answer: int


@dataclass(frozen=True)
class _Story:
    """The nouns of one problem, with the inflections the templates need."""
    name: str
    pronoun: str
    other: str
    item: tuple[str, str]
    container: tuple[str, str]

    @property
    def he(self) -> str:
        return self.pronoun

    @property
    def He(self) -> str:
        return self.pronoun.capitalize()

    @property
    def him(self) -> str:
        return "her" if self.pronoun == "she" else "him"

    @property
    def items(self) -> str:
        return self.item[1]

    def noun(self, k: int, noun: tuple[str, str] | None = None) -> str:
        singular, plural = noun or self.item
        return singular if k == 1 else plural

    def n(self, k: int, noun: tuple[str, str] | None = None) -> str:
        return f"{k} {self.noun(k, noun)}"


@dataclass(frozen=True)
class _Template:
    level: int
    people: int
    container: bool  # whether the container is named: it multiplies the distinct questions
    ranges: tuple[tuple[int, int], ...]
    valid: Callable[..., bool]
    write: Callable[..., Worded]

    @cached_property
    def space(self) -> int:
        """How many distinct questions it can write: every noun and number appears in the text."""
        names = len(NAMES) * (len(NAMES) - 1 if self.people == 2 else 1)
        grid = itertools.product(*(range(lo, hi + 1) for lo, hi in self.ranges))
        numbers = sum(self.valid(*nums) for nums in grid)
        return names * len(ITEMS) * (len(CONTAINERS) if self.container else 1) * numbers

    def sample(self, rng: random.Random) -> Problem:
        (name, pronoun), other = rng.sample(NAMES, 2)
        story = _Story(name, pronoun, other[0], rng.choice(ITEMS), rng.choice(CONTAINERS))
        nums = [rng.randint(lo, hi) for lo, hi in self.ranges]
        while not self.valid(*nums):
            nums = [rng.randint(lo, hi) for lo, hi in self.ranges]
        question, value, steps = self.write(story, *nums)
        lines = []
        for op, b in steps:
            result = _OPS[op](value, b)
            lines.append(f"{value} {op} {b} = {result}.")
            value = result
        return Problem(question, " ".join(lines + [f"The answer is {value}."]), value)


_TEMPLATES: list[_Template] = []


def _template(level: int, ranges: tuple[tuple[int, int], ...], people: int = 1, container: bool = False,
              valid: Callable[..., bool] = lambda *nums: True) -> Callable[[Callable[..., Worded]], None]:
    def add(write: Callable[..., Worded]) -> None:
        _TEMPLATES.append(_Template(level, people, container, ranges, valid, write))
    return add


@_template(1, (_OPERAND, _OPERAND))
def _buys(s: _Story, a: int, b: int) -> Worded:
    return ((f"{s.name} has {s.n(a)}. {s.He} buys {b} more {s.noun(b)}. "
              f"How many {s.items} does {s.name} have now?"), a, [("+", b)])


@_template(1, (_OPERAND, _OPERAND), people=2)
def _is_given(s: _Story, a: int, b: int) -> Worded:
    return ((f"{s.name} has {s.n(a)}. {s.other} gives {s.him} {s.n(b)}. "
              f"How many {s.items} does {s.name} have now?"), a, [("+", b)])


@_template(1, (_OPERAND, _OPERAND), people=2, valid=lambda a, b: b <= a)
def _gives(s: _Story, a: int, b: int) -> Worded:
    return ((f"{s.name} has {s.n(a)}. {s.He} gives {s.n(b)} to {s.other}. "
              f"How many {s.items} does {s.name} have left?"), a, [("-", b)])


@_template(1, (_OPERAND, _OPERAND), valid=lambda a, b: b <= a and a > 1)  # "1 of them" reads wrong
def _loses(s: _Story, a: int, b: int) -> Worded:
    return ((f"{s.name} has {s.n(a)}. {s.He} loses {b} of them. "
              f"How many {s.items} does {s.name} have left?"), a, [("-", b)])


@_template(1, (_OPERAND, _OPERAND), people=2)
def _together(s: _Story, a: int, b: int) -> Worded:
    return ((f"{s.name} has {s.n(a)}. {s.other} has {s.n(b)}. "
              f"How many {s.items} do they have together?"), a, [("+", b)])


@_template(1, (_OPERAND, _OPERAND), people=2, valid=lambda a, b: b < a)
def _more_than(s: _Story, a: int, b: int) -> Worded:
    return ((f"{s.name} has {s.n(a)}. {s.other} has {s.n(b)}. "
              f"How many more {s.items} does {s.name} have than {s.other}?"), a, [("-", b)])


@_template(2, (_FACTOR, _FACTOR), container=True)
def _boxes(s: _Story, a: int, b: int) -> Worded:
    return ((f"{s.name} has {s.n(a, s.container)} with {s.n(b)} in each {s.container[0]}. "
              f"How many {s.items} does {s.name} have?"), a, [("*", b)])


@_template(2, (_FACTOR, _FACTOR))
def _friends(s: _Story, a: int, b: int) -> Worded:
    return ((f"{s.name} has {a} friends. {s.He} gives {s.n(b)} to each friend. "
              f"How many {s.items} does {s.name} give away?"), a, [("*", b)])


@_template(2, (_FACTOR, _FACTOR, _OPERAND), container=True, valid=lambda a, b, c: c <= a * b)
def _boxes_give_away(s: _Story, a: int, b: int, c: int) -> Worded:
    return ((f"{s.name} has {s.n(a, s.container)} with {s.n(b)} in each {s.container[0]}. "
              f"{s.He} gives away {s.n(c)}. How many {s.items} does {s.name} have left?"),
            a, [("*", b), ("-", c)])


@_template(2, (_FACTOR, _FACTOR, _OPERAND), container=True)
def _boxes_buy(s: _Story, a: int, b: int, c: int) -> Worded:
    return ((f"{s.name} has {s.n(a, s.container)} with {s.n(b)} in each {s.container[0]}. "
              f"{s.He} buys {c} more {s.noun(c)}. How many {s.items} does {s.name} have now?"),
            a, [("*", b), ("+", c)])


@_template(2, (_OPERAND, _OPERAND, _OPERAND), valid=lambda a, b, c: c <= a + b)
def _buys_then_gives(s: _Story, a: int, b: int, c: int) -> Worded:
    return ((f"{s.name} has {s.n(a)}. {s.He} buys {b} more {s.noun(b)}. "
              f"Then {s.he} gives away {s.n(c)}. How many {s.items} does {s.name} have left?"),
            a, [("+", b), ("-", c)])


@_template(2, (_OPERAND, _OPERAND, _OPERAND), valid=lambda a, b, c: b <= a and a > 1)
def _loses_then_finds(s: _Story, a: int, b: int, c: int) -> Worded:
    return ((f"{s.name} has {s.n(a)}. {s.He} loses {b} of them. "
              f"Then {s.he} finds {c} more. How many {s.items} does {s.name} have now?"),
            a, [("-", b), ("+", c)])


def is_heldout(question: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether `question` belongs to the held-out split: a stable hash of its text, so the answer
    never depends on the seed, the process (Python's hash() is salted) or how many were generated."""
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def space(level: int) -> int:
    """Distinct questions a level can write, both splits together."""
    return sum(t.space for t in _templates(level))


def _templates(level: int) -> list[_Template]:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return [t for t in _TEMPLATES if t.level <= level]


def generate(n: int, split: str = "train", seed: int = 0, level: int = 1,
             heldout_fraction: float = HELDOUT_FRACTION) -> list[Problem]:
    """`n` distinct problems of `split`, the same for the same arguments; a smaller n gives a prefix."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie strictly between 0 and 1, got {heldout_fraction}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    templates = _templates(level)
    share = heldout_fraction if split == "heldout" else 1 - heldout_fraction
    total = space(level)
    if n > total * share:
        raise ValueError(f"level {level} has {total:,} distinct questions, about {total * share:,.0f} "
                         f"of them {split}: {n:,} cannot be distinct")
    rng = random.Random(seed)
    heldout = split == "heldout"
    seen: set[str] = set()
    problems: list[Problem] = []
    # coupon collecting slows near exhaustion; a generous bound turns that into an error, not a hang
    budget = int(64 * (n + 1) / share) + 1000
    for _ in range(budget):
        if len(problems) == n:
            break
        problem = rng.choice(templates).sample(rng)
        if problem.question not in seen and is_heldout(problem.question, heldout_fraction) == heldout:
            seen.add(problem.question)
            problems.append(problem)
    if len(problems) < n:
        raise ValueError(f"found only {len(problems):,} distinct {split} problems of level {level} in "
                         f"{budget:,} draws (the level has about {total * share:,.0f}); ask for fewer")
    return problems


def sft_rows(problems: Iterable[Problem]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": p.question},
                          {"role": "assistant", "content": p.solution}]} for p in problems]


def prompt_rows(problems: Iterable[Problem]) -> list[dict]:
    return [{"prompt": p.question, "answer": p.answer} for p in problems]


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    """One JSON object a line, written to a temporary file beside `path` and renamed over it, so a
    reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for secrets, not a dataset
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument("--train", type=int, default=5000, metavar="N",
                        help="training problems (default 5000)")
    parser.add_argument("--heldout", type=int, default=500, metavar="N",
                        help="held-out problems (default 500)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    parser.add_argument("--level", type=int, default=1, choices=LEVELS,
                        help="1: one addition or subtraction; 2: also multiplication and two steps "
                             "(default 1)")


def run(args: argparse.Namespace) -> int:
    """Write sft_{train,heldout}.jsonl (chat messages) and prompts_{train,heldout}.jsonl (prompt and
    answer) under args.out."""
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("heldout", args.heldout)):
        problems = generate(n, split, seed=args.seed, level=args.level)
        write_jsonl(sft_rows(problems), args.out / f"sft_{split}.jsonl")
        write_jsonl(prompt_rows(problems), args.out / f"prompts_{split}.jsonl")
        print(f"{split}: {len(problems):,} problems")
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv2 data arith", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"dsv2: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

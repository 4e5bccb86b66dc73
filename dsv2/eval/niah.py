"""Needle in a haystack: can the model retrieve one planted fact from a long context?

A random fact ("The special magic number of Berlin is 48213.") is planted at a relative depth of
a filler text cut to a target length, and the model is asked for it; greedy completions are
scored by whether they contain the value. The grid over lengths x depths shows where retrieval
fails (long contexts, the middle of the context), which a single accuracy hides.
"""

from __future__ import annotations

import inspect
import random
import re
from pathlib import Path

from ..tokenizer import Tokenizer
from .lm import EvalModel

# Standard-library docstrings: shipped with every Python, so no download, and prose about
# something other than the needle's cities and numbers.
_FILLER_MODULES = ("collections", "json", "os.path", "textwrap", "string", "itertools", "functools",
                   "argparse", "re", "random", "heapq", "csv", "statistics", "difflib", "pprint",
                   "typing", "unittest", "shlex", "calendar", "decimal", "fractions", "logging")

_CITIES = ("Berlin", "Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Hanoi", "Quito", "Dakar", "Perth",
           "Montreal", "Krakow", "Tunis", "Seville", "Bergen", "Cusco", "Kyoto", "Accra", "Tbilisi",
           "Valparaiso", "Reykjavik", "Marrakesh", "Bangalore", "Edinburgh")
_WORDS = ("lantern", "saffron", "walrus", "quartz", "marigold", "tundra", "violin", "pelican", "cobalt",
          "meadow", "origami", "zeppelin", "harbor", "juniper", "falcon", "glacier", "mosaic", "nectar")

# where filler may be cut and the needle inserted, best first: sentence ends and paragraph
# breaks, then line ends (docstrings hold lists and code), then any space
_BOUNDARIES = (re.compile(r"(?<=[.!?])\s+|\n\s*\n"), re.compile(r"\n"), re.compile(r" "))
# how far (a fraction of the text) a boundary may be from the wanted place
_SLACK = 0.03


def default_filler() -> str:
    """The docstrings of a fixed list of standard-library modules and their public members."""
    import importlib

    parts = []
    for name in _FILLER_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__] + [getattr(getattr(module, a, None), "__doc__", None)
                                   for a in sorted(getattr(module, "__all__", ()))]
        parts += [inspect.cleandoc(d) for d in docs if isinstance(d, str) and len(d) > 80]
    if not parts:
        raise RuntimeError("no docstrings to build the filler from (python -OO strips them): pass filler")
    # one docstring per paragraph; duplicates (re-exported members) would repeat text for nothing
    return "\n\n".join(dict.fromkeys(parts))


def make_needle(rng: random.Random) -> tuple[str, str, str]:
    """(needle sentence, question, answer) of a random fact."""
    city = rng.choice(_CITIES)
    if rng.random() < 0.5:
        kind, value = "number", str(rng.randint(10000, 99999))
    else:
        kind, value = "word", rng.choice(_WORDS)
    return (f"The special magic {kind} of {city} is {value}.",
            f"What is the special magic {kind} of {city}?", value)


def _boundary(text: str, target: float, before: bool = False) -> int:
    """The best-tier boundary of `text` within _SLACK of character `target` (only those at or
    before it with `before`): the nearest one, at the start of the whitespace it stands on."""
    slack = _SLACK * len(text)
    for pattern in _BOUNDARIES:
        near = [b for m in pattern.finditer(text) for b in (m.start(),)
                if abs(b - target) <= slack and not (before and b > target)]
        if near:
            return min(near, key=lambda b: abs(b - target))
    return round(target)


def _cut(text: str, n_chars: int) -> str:
    """text[:n_chars], moved back a little to a sentence end where one is near."""
    if n_chars >= len(text):
        return text
    return text[: _boundary(text[: n_chars + 1], n_chars, before=True)].rstrip()


def _prompt(tokenizer: Tokenizer, filler: str, depth: float, needle: str, question: str) -> list[int]:
    # the needle goes in at the sentence boundary nearest the requested depth
    at = 0 if depth == 0 else len(filler) if depth == 1 else _boundary(filler, depth * len(filler))
    before, after = filler[:at].rstrip(), filler[at:].lstrip()
    content = " ".join(p for p in (before, needle, after) if p) + "\n\n" + question
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def make_haystack(tokenizer: Tokenizer, filler_text: str, context_tokens: int, depth: float, needle: str,
                  question: str) -> list[int]:
    """A chat prompt of about `context_tokens` tokens: filler (repeated or cut, at a sentence end
    where possible) with `needle` at relative depth `depth` (0 start, 1 end), then `question`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is not in [0, 1]")
    overhead = len(_prompt(tokenizer, "", 0.0, needle, question))
    if overhead >= context_tokens:
        raise ValueError(f"{context_tokens} tokens leave no room for filler (needle and question take {overhead})")
    filler_text = filler_text.strip()
    if not filler_text:
        raise ValueError("empty filler text")
    # characters per token from the filler itself, then a few corrections: tokens at the joins
    # differ from the parts', so the first guess is only close
    sample = filler_text[:20000]
    chars_per_token = len(sample) / max(1, len(tokenizer.encode(sample)))
    budget = context_tokens - overhead
    repeats = int(budget * chars_per_token * 1.5 / len(filler_text)) + 1
    source = "\n\n".join([filler_text] * repeats)
    n_chars = int(budget * chars_per_token)
    best = None
    for _ in range(6):
        ids = _prompt(tokenizer, _cut(source, n_chars), depth, needle, question)
        if len(ids) <= context_tokens and (best is None or len(ids) > len(best)):
            best = ids
        miss = context_tokens - len(ids)
        if 0 <= miss <= max(2, context_tokens // 100):
            break
        n_chars = max(1, n_chars + int(miss * chars_per_token * (0.9 if miss > 0 else 1.1)))
        if n_chars > len(source):
            source = f"{source}\n\n{filler_text}"
    return best if best is not None else ids


def default_lengths(max_len: int, answer_room: int) -> list[int]:
    """Powers of two from 256 that leave `answer_room` tokens for the answer, then the longest
    context that does (so the grid reaches the model's whole window)."""
    lengths = []
    length = 256
    while length + answer_room <= max_len:
        lengths.append(length)
        length *= 2
    longest = max_len - answer_room
    return lengths + [longest] if not lengths or lengths[-1] < longest else lengths


def run_niah(model: EvalModel, lengths: list[int] | None = None, depths: list[float] | None = None,
             trials: int = 1, filler: str | None = None, seed: int = 0, max_new_tokens: int = 16,
             heatmap: str | Path | None = None, needles=make_needle) -> dict:
    """Retrieval accuracy over a grid of context lengths x needle depths, `trials` random needles
    per cell, from one batch of greedy generations. `needles(rng)` -> (needle sentence, question,
    answer): the facts planted (default: make_needle's)."""
    lengths = list(lengths) if lengths else default_lengths(model.max_len, max_new_tokens)
    depths = list(depths) if depths is not None else [0.0, 0.25, 0.5, 0.75, 1.0]
    too_long = [n for n in lengths if n + max_new_tokens > model.max_len]
    if too_long:
        raise ValueError(f"lengths {too_long} + {max_new_tokens} answer tokens exceed the context ({model.max_len})")
    filler_text = filler if filler is not None else default_filler()
    rng = random.Random(seed)
    cells, prompts, answers = [], [], []
    for i in range(len(depths)):
        for j in range(len(lengths)):
            for _ in range(trials):
                needle, question, answer = needles(rng)
                prompts.append(make_haystack(model.tokenizer, filler_text, lengths[j], depths[i], needle, question))
                cells.append((i, j))
                answers.append(answer)
    completions = [c[0] for c in model.generate(prompts, max_new_tokens)]

    hits = [[0] * len(lengths) for _ in depths]
    samples = []
    for (i, j), prompt, answer, completion in zip(cells, prompts, answers, completions):
        # words compare case-insensitively: "Lantern." is the right answer to a sentence-initial ask
        correct = answer.lower() in completion.lower()
        hits[i][j] += correct
        samples.append({"length": lengths[j], "depth": depths[i], "prompt_tokens": len(prompt),
                        "answer": answer, "completion": completion, "correct": correct})
    grid = [[h / trials for h in row] for row in hits]
    result = {
        "task": "niah",
        "metrics": {"accuracy": sum(s["correct"] for s in samples) / len(samples)},
        "grid": {"lengths": lengths, "depths": depths, "accuracy": grid},
        "config": {"lengths": lengths, "depths": depths, "trials": trials, "seed": seed,
                   "max_new_tokens": max_new_tokens, "filler": "custom" if filler is not None else "stdlib docstrings"},
        "samples": samples,
    }
    if heatmap is not None:
        plot_heatmap(result["grid"], heatmap)
    return result


def plot_heatmap(grid: dict, path: str | Path) -> None:
    """Accuracy per (length, depth) cell as an annotated PNG."""
    # the Agg canvas directly, not pyplot: no global backend switch inside a library call
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lengths, depths, acc = grid["lengths"], grid["depths"], grid["accuracy"]
    fig = Figure(figsize=(1.0 + 0.9 * len(lengths), 1.0 + 0.6 * len(depths)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title("needle in a haystack: accuracy")
    for i, row in enumerate(acc):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)

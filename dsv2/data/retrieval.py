"""Synthetic retrieval documents: a key planted in filler text, asked for and answered at the end.

A small model learns long-range retrieval only if its data asks for it (the paper's 128K model
was trained on real long documents; a miniature on a few megabytes of text needs a push). Each
document is a stretch of the corpus's own text with "The pass key of <word> is <number>."
inserted at a random depth, then "What is the pass key of <word>? The pass key of <word> is
<number>." Learning the answer means attending back to the key, wherever it sits. The wording
differs from the needle-in-a-haystack eval's ("the special magic number of <city>"), so the eval
measures retrieval, not a memorized template.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .corpus import Document

_KEYS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "hollow", "indigo", "jasper",
         "kestrel", "lagoon", "mistral", "nimbus", "onyx", "prairie", "quill", "raven", "sierra", "thistle",
         "umber", "vesper", "willow", "yarrow", "zephyr")
# keys no training document uses: an eval with them measures retrieval, not memorized pairs
HELD_OUT_KEYS = ("acorn", "bramble", "canyon", "dune", "estuary", "fennel", "granite", "heron")


def pass_key(rng: random.Random, keys: Sequence[str] = HELD_OUT_KEYS) -> tuple[str, str, str]:
    """(needle sentence, question, answer) in the training documents' wording, for eval/niah.py's
    `run_niah(needles=...)`; by default with held-out keys."""
    key, value = rng.choice(keys), str(rng.randint(10000, 99999))
    return f"The pass key of {key} is {value}.", f"What is the pass key of {key}?", value


def retrieval_documents(corpus: Sequence[Document], n: int, min_chars: int, max_chars: int,
                        seed: int = 0) -> list[Document]:
    """`n` documents of min_chars..max_chars of filler drawn from `corpus` (consecutive text from a
    random place), each with one pass key planted at a uniform random depth and retrieved at the end."""
    if n < 0 or not 0 < min_chars <= max_chars:
        raise ValueError(f"retrieval documents: n = {n}, chars {min_chars}..{max_chars}: need n >= 0 and "
                         "0 < min <= max")
    text = "\n\n".join(doc.text for doc in corpus)
    if len(text) < max_chars:
        raise ValueError(f"the corpus has {len(text):,} characters, fewer than a {max_chars:,}-character document")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(min_chars, max_chars)
        start = rng.randrange(len(text) - length + 1)
        filler = text[start:start + length]
        key, value = rng.choice(_KEYS), rng.randint(10000, 99999)
        cut = _space_near(filler, rng.random())
        body = f"{filler[:cut]} The pass key of {key} is {value}. {filler[cut:]}"
        out.append(Document(f"retrieval/{i:06d}", f"{body}\n\nWhat is the pass key of {key}? "
                            f"The pass key of {key} is {value}.", "retrieval"))
    return out


def _space_near(text: str, depth: float) -> int:
    """A word boundary near `depth` (0 start, 1 end) of text, so the key does not split a word."""
    at = round(depth * len(text))
    space = text.rfind(" ", 0, at)
    return at if space < 0 else space

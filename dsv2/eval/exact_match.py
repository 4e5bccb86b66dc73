"""Generation scored by exact match of the final answer (GSM8K / MATH style).

Rows are GSM8K's JSONL: {"question": str, "answer": "worked solution ... #### 72"} (a bare number
as the answer works too). The model sees K solved examples ("Question: ...\nAnswer: <solution>")
and the question, generates greedily until the next "Question:", and its answer is extracted by
the rules shared with GRPO's math reward (dsv2.align.rewards.extract_answer): the last "The answer
is X", else "#### X", else the last number; numbers are compared in canonical form (commas, $,
19.0 == 19).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..align.rewards import extract_answer
from .lm import EvalModel
from .multiple_choice import fewshot

STOP = ["\n\nQuestion:", "Question:", "\n\n\n"]


def load(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("question"), str) or "answer" not in row:
            raise ValueError(f"{path}:{i}: needs 'question' (a string) and 'answer'")
        gold = extract_answer(str(row["answer"]))
        if gold is None:
            raise ValueError(f"{path}:{i}: no number in the answer {row['answer']!r}")
        rows.append({"question": row["question"], "solution": str(row["answer"]), "gold": gold})
    if not rows:
        raise ValueError(f"{path}: no questions")
    return rows


def run_exact_match(model: EvalModel, data: str | Path, limit: int | None = None, num_fewshot: int = 4,
                    seed: int = 0, max_new_tokens: int = 256) -> dict:
    rows = load(data)
    rng = random.Random(seed)
    chosen = rows[:limit] if limit else rows
    texts = []
    for i, row in enumerate(chosen):
        shots = [rows[j] for j in fewshot(len(rows), i, num_fewshot, rng)]
        texts.append("".join(f"Question: {s['question']}\nAnswer: {s['solution']}\n\n" for s in shots)
                     + f"Question: {row['question']}\nAnswer:")
    tok = model.tokenizer
    ids = [tok.encode(t, add_bos=tok.bos_token_id is not None) for t in texts]
    outs = model.generate(ids, max_new_tokens, stop=STOP)
    samples = []
    for row, out in zip(chosen, outs):
        pred = extract_answer(out[0])
        samples.append({"question": row["question"], "gold": row["gold"], "completion": out[0], "pred": pred,
                        "correct": pred == row["gold"]})
    return {"task": "exact_match", "data": str(data),
            "metrics": {"exact_match": sum(s["correct"] for s in samples) / len(samples), "questions": len(samples)},
            "config": {"num_fewshot": num_fewshot, "seed": seed, "limit": limit, "max_new_tokens": max_new_tokens},
            "samples": samples}

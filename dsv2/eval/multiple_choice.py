"""Multiple choice by log-likelihood (MMLU / ARC / HellaSwag style), as lm-evaluation-harness scores it.

Each option is scored as the continuation of the question's prompt; the prediction is the option
with the highest summed log-probability (accuracy) and, length-normalized, the highest
log-probability per byte of the option's text (acc_norm, which removes the bias towards short
options). Few-shot prompts prepend K solved examples drawn, by a seed, from the other questions.

Rows are JSONL, in any of these shapes:
- {"question": str, "choices": [str, ...], "answer": int | "A".."Z"}          (MMLU-like)
- {"question": {"stem": str, "choices": [{"label": "A", "text": str}, ...]}, "answerKey": "A"}  (ARC)
- {"ctx": str, "endings": [str, ...], "label": int | "0"}                       (HellaSwag)
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from tqdm import tqdm

from .lm import EvalModel


def normalize(row: dict) -> dict:
    """Any supported row -> {"question": str, "choices": [str], "answer": int}."""
    if "endings" in row:
        q, choices, answer = row.get("ctx", ""), row["endings"], row["label"]
    elif isinstance(row.get("question"), dict):
        q = row["question"]["stem"]
        labels = [c["label"] for c in row["question"]["choices"]]
        choices = [c["text"] for c in row["question"]["choices"]]
        answer = labels.index(str(row["answerKey"]))
    else:
        q, choices, answer = row["question"], row["choices"], row["answer"]
    if isinstance(answer, str):
        answer = int(answer) if answer.isdigit() else string.ascii_uppercase.index(answer.strip().upper())
    if not isinstance(q, str) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError("needs a question string and a non-empty list of string choices")
    if not 0 <= answer < len(choices):
        raise ValueError(f"answer {answer} is not one of the {len(choices)} choices")
    return {"question": q, "choices": list(choices), "answer": answer}


def load(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(normalize(json.loads(line)))
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise ValueError(f"{path}:{i}: not a multiple-choice row ({e.__class__.__name__}: {e})") from None
    if not rows:
        raise ValueError(f"{path}: no questions")
    return rows


def _shot(row: dict, solved: bool) -> str:
    text = f"Question: {row['question']}\nAnswer:"
    return text + f" {row['choices'][row['answer']]}\n\n" if solved else text


def fewshot(n: int, i: int, k: int, rng: random.Random) -> list[int]:
    """k distinct indices of [0, n) other than i (in O(k), not O(n): MMLU has 14K questions)."""
    picked = [j for j in rng.sample(range(n), min(k + 1, n)) if j != i]
    return picked[: min(k, n - 1)]


def prompts(rows: list[dict], count: int, num_fewshot: int, seed: int = 0) -> list[str]:
    """The first `count` questions' prompts: num_fewshot other questions solved, then the
    question, ending in 'Answer:'."""
    rng = random.Random(seed)
    return ["".join(_shot(rows[j], True) for j in fewshot(len(rows), i, num_fewshot, rng)) + _shot(rows[i], False)
            for i in range(count)]


def run_multiple_choice(model: EvalModel, data: str | Path, limit: int | None = None, num_fewshot: int = 0,
                        seed: int = 0) -> dict:
    every = load(data)
    rows = every[:limit] if limit else every
    texts = prompts(every, len(rows), num_fewshot, seed)
    tok = model.tokenizer
    requests, owner = [], []
    for q, (row, text) in enumerate(zip(rows, texts)):
        context = tok.encode(text, add_bos=tok.bos_token_id is not None)
        for choice in row["choices"]:
            requests.append((context, tok.encode(" " + choice)))
            owner.append(q)
    scores = []
    for i in tqdm(range(0, len(requests), 256), desc="multiple choice", unit="batch", disable=None):
        scores += model.loglikelihood(requests[i:i + 256])
    samples, k = [], 0
    for row in rows:
        ll = [s for s, _ in scores[k:k + len(row["choices"])]]
        k += len(row["choices"])
        per_byte = [v / max(1, len((" " + c).encode())) for v, c in zip(ll, row["choices"])]
        pred, pred_norm = max(range(len(ll)), key=ll.__getitem__), max(range(len(ll)), key=per_byte.__getitem__)
        samples.append({"question": row["question"], "answer": row["answer"], "pred": pred, "pred_norm": pred_norm,
                        "loglikelihoods": ll})
    n = len(samples)
    return {"task": "multiple_choice", "data": str(data),
            "metrics": {"acc": sum(s["pred"] == s["answer"] for s in samples) / n,
                        "acc_norm": sum(s["pred_norm"] == s["answer"] for s in samples) / n, "questions": n},
            "config": {"num_fewshot": num_fewshot, "seed": seed, "limit": limit}, "samples": samples}

"""Conversations as training rows: the chat template's tokens and which of them are trained.

A conversation is rendered with the tokenizer's chat template and tokenized whole, as the engine
and the server tokenize a prompt, so the context the model learns from is the one it will see.
The assistant turns' tokens are found by character spans: turn i's span starts where the prompt
for it (the messages before it plus the generation prompt, "Assistant:") ends and runs to the end
of the turn, its EOS included. So the model learns to write each answer and to stop, and never
learns to write the user's side.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..tokenizer import ROLES, Tokenizer


@dataclass(frozen=True)
class ChatExample:
    tokens: list[int]
    trained: list[bool]  # per token: an assistant token, predicted from the ones before it
    line: int = 0  # where it came from in its file (1-based), for messages


class BadRow(ValueError):
    """A JSONL row that cannot be trained on; the message says which line and why."""


def encode_chat(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """messages -> (tokens, trained). Raises ValueError for a conversation with no assistant turn
    or one the template cannot render."""
    if not any(m.get("role") == "assistant" for m in messages if isinstance(m, dict)):
        raise ValueError("no assistant turn: nothing to train on")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(turn) and turn.startswith(prompt)):
            raise ValueError("the chat template does not render a conversation's turns as prefixes of it")
        spans.append((len(prompt), len(turn)))
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    trained = [any(a <= lo < b for a, b in spans) for lo, _ in enc.offsets]
    return enc.ids, trained


def _check_row(row: object) -> list[dict]:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise ValueError("expected an object with a 'messages' list")
    for i, m in enumerate(row["messages"]):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i} has unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} has no string 'content'")
    return row["messages"]


def read_chats(path: str | Path, tokenizer: Tokenizer, max_len: int, strict: bool = False,
               report=print) -> list[ChatExample]:
    """Every usable conversation of a JSONL file of OpenAI-style `{"messages": [...]}` rows.

    A bad row (not JSON, unknown role, no assistant turn, longer than max_len tokens, no trained
    token left within max_len) is reported with its line number and skipped; with `strict` the
    first one raises BadRow instead. Nothing bad is ever trained on."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    examples, skipped = [], 0
    for line_no, line in _lines(path):
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e.msg})") from None
            tokens, trained = encode_chat(tokenizer, _check_row(row))
            if len(tokens) > max_len:
                raise ValueError(f"{len(tokens)} tokens, over the maximum length of {max_len}")
            examples.append(ChatExample(tokens, trained, line_no))
        except ValueError as e:
            if strict:
                raise BadRow(f"{path}:{line_no}: {e}") from None
            report(f"dsv2: {path}:{line_no}: skipped: {e}")
            skipped += 1
    if not examples:
        raise ValueError(f"{path}: no usable conversation ({skipped} skipped)")
    return examples


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield i, line

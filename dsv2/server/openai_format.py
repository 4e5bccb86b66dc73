"""Engine outputs in OpenAI's response shapes: choices, stream chunks, logprobs, usage.

Token strings for logprobs come from the byte-level vocabulary so that `bytes` is exact even for a
token holding part of a UTF-8 character (its `token` then shows U+FFFD, as OpenAI's does).
"""

from __future__ import annotations

import functools
import time
import uuid

from ..engine.engine import CompletionOutput, RequestOutput
from ..tokenizer import Tokenizer


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(id: str, object: str, model: str, choices: list, created: int | None = None, **extra) -> dict:
    return {"id": id, "object": object, "created": created or int(time.time()), "model": model,
            "choices": choices, **extra}


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of the byte-level BPE alphabet: printable bytes map to themselves, the others
    to the code points from 256 upward, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TokenText:
    """Token id -> (text, UTF-8 bytes), cached per tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.tokenizer.backend.id_to_token(token_id) or ""
            table = _unicode_to_byte()
            if piece and all(ch in table for ch in piece):
                raw = bytes(table[ch] for ch in piece)
            else:  # an added (special) token: its content as written
                raw = piece.encode()
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return hit


def completion_logprobs(out: CompletionOutput, start: int, token_text: TokenText, offset: int) -> dict:
    """The legacy completions shape for out's tokens from `start` on; offsets count from `offset`."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, step in zip(out.token_ids[start:], out.logprobs[start:]):
        text = token_text(token_id)[0]
        tokens.append(text)
        token_logprobs.append(step[token_id])
        top.append({token_text(t)[0]: lp for t, lp in sorted(step.items(), key=lambda kv: -kv[1])})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(out: CompletionOutput, start: int, top_n: int, token_text: TokenText) -> dict:
    """The chat shape: per token its text, logprob and bytes, and the top_n alternatives."""
    content = []
    for token_id, step in zip(out.token_ids[start:], out.logprobs[start:]):
        text, raw = token_text(token_id)
        ranked = sorted(step.items(), key=lambda kv: -kv[1])[:top_n]
        content.append({"token": text, "logprob": step[token_id], "bytes": list(raw), "top_logprobs": [
            {"token": token_text(t)[0], "logprob": lp, "bytes": list(token_text(t)[1])} for t, lp in ranked]})
    return {"content": content}


class ChoiceStream:
    """What of a request's samples was already sent, so each chunk carries only the news."""

    def __init__(self, n: int):
        self.sent_tokens = [0] * n
        self.done = [False] * n

    def news(self, out: RequestOutput):
        """(sample, new text, first new token index, finish_reason or None) for each sample that
        advanced or finished since the last call."""
        for k, c in enumerate(out.outputs):
            if self.done[k]:
                continue
            start = self.sent_tokens[k]
            text = out.new_text[k] if out.new_text else ""
            finished = c.finish_reason is not None
            if len(c.token_ids) == start and not text and not finished:
                continue
            self.sent_tokens[k] = len(c.token_ids)
            self.done[k] = finished
            yield c, text, start, c.finish_reason

"""Sliding-window perplexity of a text file.

The file is tokenized whole and cut into windows of `window` tokens, each ending `stride` tokens
after the last; each window scores only the tokens the previous one did not, so every token after the
first is scored exactly once, with at least window - stride tokens of left context once past the
first window (the strided evaluation of the HF perplexity guide). stride = window - 1 is the
cheapest (one forward pass per window - 1 tokens); stride = 1 gives every token the full window.

Plain forward passes of `model.model`, not the engine: prompt logprobs of tens of thousands of
tokens gain nothing from paging, and a forward is the obviously correct computation.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model import Transformer
from .lm import EvalModel

# fp32 logits of a whole batch of windows are materialized at once: bound their size so a
# 100k-vocabulary model at a 4k window does not ask for tens of GB
_LOGIT_BUDGET = 1 << 28  # elements (1 GiB of fp32)


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) of each window over tokens [0, n_tokens): the window
    feeds tokens[begin:end] and scores targets [first, end). After the first, every window is
    full and scores its last `stride` tokens (fewer for the last), which see the rest as context."""
    if window < 2:
        raise ValueError(f"a window of {window} tokens scores nothing")
    if not 1 <= stride < window:
        # stride = window would leave each window's first target without context
        raise ValueError(f"stride {stride} must be in [1, window={window})")
    out = []
    end = min(window, n_tokens)
    out.append((0, end, 1))  # token 0 has nothing to be predicted from
    while end < n_tokens:
        first, end = end, min(end + stride, n_tokens)
        out.append((end - window, end, first))
    return out


@torch.no_grad()
def window_nll(model: Transformer, tokens: list[int], spans: list[tuple[int, int, int]],
               device: torch.device | str) -> list[torch.Tensor]:
    """Per-target negative log-likelihoods (fp64, CPU) of each span's scored targets, from one
    forward pass of the whole batch; shorter windows are right-padded and masked."""
    width = max(end - begin for begin, end, _ in spans)
    batch = torch.zeros(len(spans), width, dtype=torch.long)
    valid = torch.zeros(len(spans), width, dtype=torch.bool)
    for i, (begin, end, _) in enumerate(spans):
        batch[i, : end - begin] = torch.tensor(tokens[begin:end])
        valid[i, : end - begin] = True
    batch, valid = batch.to(device), valid.to(device)
    logits = model(batch, attention_mask=None if valid.all() else valid)
    out = []
    for i, (begin, end, first) in enumerate(spans):
        # logits at position p predict token p + 1 (window-relative)
        lo, hi = first - begin - 1, end - begin - 1
        logp = F.log_softmax(logits[i, lo:hi].float(), dim=-1)
        target = batch[i, lo + 1: hi + 1]
        out.append(-logp.gather(1, target[:, None])[:, 0].double().cpu())
    return out


def run_perplexity(model: EvalModel, text_file: str | Path, window: int | None = None,
                   stride: int | None = None, limit: int | None = None) -> dict:
    """Perplexity, NLL per token and bits per byte of a UTF-8 text file; `limit` caps the number
    of tokens scored (the first limit + 1 tokens of the file are used)."""
    text = Path(text_file).read_text(encoding="utf-8")
    tokens = model.tokenizer.encode(text)
    if limit is not None:
        tokens = tokens[: limit + 1]
    if len(tokens) < 2:
        raise ValueError(f"{text_file}: {len(tokens)} token(s), nothing to score")
    window = window or model.max_len
    if window > model.max_len:
        raise ValueError(f"window {window} exceeds the model's context ({model.max_len})")
    stride = stride or max(1, window // 2)
    spans = windows(len(tokens), window, stride)

    per_batch = max(1, min(model.batch_size, _LOGIT_BUDGET // (window * model.model.config.vocab_size)))
    total = 0.0
    count = 0
    with tqdm(total=len(spans), desc="perplexity", unit="window", disable=None) as bar:
        for i in range(0, len(spans), per_batch):
            chunk = spans[i:i + per_batch]
            for nll in window_nll(model.model, tokens, chunk, model.device):
                total += nll.sum().item()
                count += nll.numel()
            bar.update(len(chunk))
    assert count == len(tokens) - 1, (count, len(tokens))

    # bytes of the scored text: everything after the first token, as the tokenizer renders it
    # (decoding prefixes, so a multi-byte character split across tokens is counted once)
    n_bytes = (len(model.tokenizer.decode(tokens).encode("utf-8"))
               - len(model.tokenizer.decode(tokens[:1]).encode("utf-8")))
    nll_per_token = total / count
    return {
        "task": "perplexity",
        "metrics": {
            "perplexity": math.exp(nll_per_token),
            "nll_per_token": nll_per_token,
            "bits_per_byte": total / math.log(2) / n_bytes if n_bytes > 0 else float("nan"),
            "tokens": count,
            "bytes": n_bytes,
        },
        "config": {"text_file": str(text_file), "window": window, "stride": stride, "limit": limit,
                   "windows": len(spans), "file_tokens": len(tokens)},
    }

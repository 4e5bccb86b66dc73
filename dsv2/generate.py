"""Reference generation: batched, a contiguous latent cache, simple and obviously right.

This is what the engine is tested against, so it favours clarity over speed: every step runs the
whole batch, finished rows included, and the cache is a plain [batch, max_len] buffer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .model import LatentCache, Transformer


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: greedy at temperature 0, else top-k, then top-p, then a draw."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"invalid sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generators)])


def _pad(seqs: list[list[int]], side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        tokens[i, cols] = torch.tensor(s, dtype=torch.long)
        valid[i, cols] = True
    return tokens.to(device), valid.to(device)


@torch.no_grad()
def _steps(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    padding_side: str,
    use_cache: bool,
    absorb: bool,
) -> Iterator[torch.Tensor]:
    """Yield next-token logits [B, V] for each step; the caller sends back the chosen tokens [B]."""
    param = next(model.parameters())
    device = param.device
    tokens, valid = _pad(prompts, padding_side, device)
    lengths = valid.sum(dim=1)
    width = tokens.shape[1]
    rows = torch.arange(len(prompts), device=device)
    if not use_cache:  # recompute everything each step: the cache's own reference
        seqs = [list(p) for p in prompts]
        for _ in range(max_new_tokens):
            tokens, valid = _pad(seqs, padding_side, device)
            last = valid.sum(1) - 1 if padding_side == "right" else torch.full_like(rows, tokens.shape[1] - 1)
            chosen = yield model(tokens, attention_mask=valid, absorb=absorb)[rows, last]
            for s, t in zip(seqs, chosen.tolist()):
                s.append(t)
        return
    cache = LatentCache(model.config, len(prompts), width + max_new_tokens, device, param.dtype)
    slots = torch.arange(width, device=device).expand(len(prompts), -1)
    if padding_side == "left":
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        last = torch.full_like(rows, width - 1)
    else:
        positions = slots
        last = lengths - 1
    logits = model(tokens, positions, valid, cache, slots, absorb=absorb)[rows, last]
    for step in range(max_new_tokens):
        chosen = yield logits
        if step == max_new_tokens - 1:
            return
        pos = (lengths + step)[:, None]
        slot = pos if padding_side == "right" else torch.full_like(pos, width + step)
        logits = model(chosen[:, None], pos, None, cache, slot, absorb=absorb)[:, -1]


def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: list[int] | None = None,
    seed: int | None = None,
    padding_side: str = "left",
    use_cache: bool = True,
    absorb: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt. A row ends at max_new_tokens or after emitting a stop token
    (which is kept as its last token). With a seed, row i draws from its own generator seeded
    seed + i, so a call is reproducible."""
    out: list[list[int]] = [[] for _ in prompts]
    for i, token in _stream(model, prompts, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed,
                            padding_side, use_cache, absorb):
        out[i].append(token)
    return out


def stream(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    **kwargs,
) -> Iterator[int]:
    """One prompt's new tokens as they are produced (same settings as `generate`)."""
    for _, token in _stream(model, [prompt], max_new_tokens, **kwargs):
        yield token


def _stream(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: list[int] | None = None,
    seed: int | None = None,
    padding_side: str = "left",
    use_cache: bool = True,
    absorb: bool = False,
) -> Iterator[tuple[int, int]]:
    """(row, token) pairs in the order they are produced."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
    vocab = model.config.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {vocab})")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > model.config.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens = {longest} exceeds max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    generators = None
    if seed is not None:
        generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(prompts))]
    stops = set(stop_token_ids or ())
    done = [False] * len(prompts)
    steps = _steps(model, prompts, max_new_tokens, padding_side, use_cache, absorb)
    logits = next(steps)
    while True:
        chosen = sample(logits, temperature, top_p, top_k, generators)
        for i, t in enumerate(chosen.tolist()):
            if not done[i]:
                yield i, t
                done[i] = t in stops
        if all(done):
            return
        try:
            logits = steps.send(chosen)
        except StopIteration:
            return

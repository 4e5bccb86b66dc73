"""Batches of token rows and the log-probabilities a model gives them: what SFT and GRPO share."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_rows(rows: list[list[int]], masks: list[list[bool]], device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad rows to one width -> tokens [B, S], valid [B, S] (real tokens), mask [B, S]."""
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, : len(r)] = True
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return tokens.to(device), valid.to(device), mask.to(device)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [B, S, V] from tokens [B, S] -> log p(tokens[:, t+1] | tokens[:, :t+1]) [B, S-1], in fp32."""
    logp = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    return logp.view(tokens.shape[0], -1)

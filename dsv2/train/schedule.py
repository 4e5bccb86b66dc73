"""The paper's learning-rate schedule and batch-size ramp, both driven by tokens seen.

LR: linear warmup from 0 over the first warmup_steps, then constant, multiplied by 0.316 once 60%
of the training tokens are seen and by 0.316 again at 90%. Batch size (sequences) grows linearly
from batch_start to batch_end over the first ramp_tokens (DeepSeek-V2: 2,304 -> 9,216 over 225B).
"""

from __future__ import annotations


def learning_rate(step: int, tokens_seen: int, peak: float, warmup_steps: int, total_tokens: int,
                  decay_at: tuple[float, ...] = (0.6, 0.9), decay_factor: float = 0.316) -> float:
    """LR for optimizer step `step` (0-based) taken after `tokens_seen` tokens."""
    lr = peak * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else peak
    for frac in decay_at:
        if tokens_seen >= frac * total_tokens:
            lr *= decay_factor
    return lr


def batch_size(tokens_seen: int, start: int, end: int, ramp_tokens: int, multiple: int = 1) -> int:
    """Sequences per optimizer step, rounded down to a multiple of the micro-batch."""
    if ramp_tokens <= 0 or tokens_seen >= ramp_tokens:
        size = end
    else:
        size = start + (end - start) * tokens_seen / ramp_tokens
    return max(multiple, int(size) // multiple * multiple)

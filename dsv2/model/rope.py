"""Rotary position embedding on the decoupled rope dims, with YaRN as the released models use it
(or plain position interpolation, "linear", the ablation the paper's YaRN is compared with).

Only q_rope and the shared k_rope rotate (MLA's decoupled RoPE); the rotation pairs dims (2i, 2i+1)
of the checkpoint's weight order, which is what transformers computes with complex numbers.
LLaMA-architecture MHA (DeepSeek LLM) rotates the whole head and pairs dim i with dim i + dim/2
("rotate half"), the order its checkpoints' q_proj/k_proj rows are in: `apply_rope_rotate_half`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, RopeScaling, yarn_mscale


def inv_frequencies(dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[dim/2] inverse frequencies; YaRN blends interpolated and extrapolated ones by a ramp."""
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolated = 1.0 / pos_freqs
    if scaling is None:
        return extrapolated
    interpolated = 1.0 / (scaling.factor * pos_freqs)
    if scaling.type == "linear":  # position interpolation: every frequency slowed by the factor
        return interpolated

    def correction_dim(rotations: float) -> float:
        # the dim whose wavelength completes `rotations` turns over the original context
        return dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp  # high-frequency dims keep their original frequency
    return interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated


def cos_sin_scale(scaling: RopeScaling | None) -> float:
    """YaRN multiplies cos/sin by mscale(s, mscale) / mscale(s, mscale_all_dim) (1 when equal)."""
    if scaling is None or scaling.type == "linear":
        return 1.0
    return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim = config.qk_rope_head_dim
        self.theta = config.rope_theta
        self.scaling = config.rope_scaling
        self.register_buffer("inv_freq", inv_frequencies(self.dim, self.theta, self.scaling), persistent=False)
        self.attention_factor = cos_sin_scale(self.scaling)

    def reset_parameters(self) -> None:
        """Recompute the buffer, e.g. after the model was built on the meta device."""
        self.inv_freq = inv_frequencies(self.dim, self.theta, self.scaling).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] -> cos, sin [B, S, dim/2] in fp32."""
        freqs = positions.float()[..., None] * self.inv_freq
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, dim] (or [B, S, dim]) rotated in interleaved pairs; computed in fp32."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_rope_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, dim] (or [B, S, dim]) rotated in LLaMA's convention, dim i paired with i + dim/2;
    computed in fp32."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    x0, x1 = x.float().chunk(2, dim=-1)
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).to(x.dtype)

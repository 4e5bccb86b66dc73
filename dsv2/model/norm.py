import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm with fp32 statistics; the weight multiplies after casting back, as the checkpoints expect."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # in x's dtype: under autocast an fp32 weight would otherwise promote the stream back to fp32
        return self.weight.to(x.dtype) * xf.to(x.dtype)

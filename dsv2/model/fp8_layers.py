"""FP8 weights held in memory: the model with its quantized projections in e4m3 plus block scales.

`quantize_model_` swaps a model's linear layers that the checkpoint format quantizes (model/fp8.py)
for `FP8Linear`s and stores the routed experts in FP8 (`Experts.to_fp8_`), quantizing each weight
as it goes, or only reshaping when the model is still on the meta device (the loader then copies
FP8 tensors, or quantizes bf16 ones, straight into place). One exception to the checkpoint's list:
kv_b_proj stays in the model's dtype, because the absorbed decode reads it per head as W^UK and
W^UV (a batched few-row product, not a linear layer); it is under 1% of the weights.

The matmuls (kernels/fp8_gemm.py, kernels/small_linear.py, kernels/moe_gemm.py) read the FP8
weights where the GPU has FP8 and dequantize them per call where it does not (CPU: the bundled
model and the CPU tests run so).
"""

from __future__ import annotations

import torch
from torch import nn

from . import fp8
from .kernels.fp8_gemm import fp8_linear, warn_if_unsupported
from .kernels.small_linear import small_linear_fp8, small_linear_supported
from .moe import Experts

_KEPT = ("kv_b_proj",)  # in the checkpoint's FP8 list, held in the model's dtype (see above)


class FP8Linear(nn.Module):
    """y = x W^T (+ b) with W [out, in] stored as e4m3 `weight` and float32 `weight_scale_inv`
    [ceil(out/128), ceil(in/128)] (the checkpoint's names); inference only: the weight has no gradient."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 act_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_dtype = act_dtype  # the activations' dtype, which outputs keep
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=fp8.FP8, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(fp8.scale_shape((out_features, in_features)), dtype=torch.float32, device=device),
            requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=act_dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """The FP8 twin of a linear layer: its weight quantized (left empty on the meta device)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        if not w.is_meta:
            with torch.no_grad():
                q, scale = fp8.quantize(w)
                layer.weight.copy_(q)
                layer.weight_scale_inv.copy_(scale)
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a few rows (decode): the weight-streaming kernel, activations kept in their dtype
        if self.bias is None and small_linear_supported(x.reshape(1, -1, x.shape[-1]), self.weight, scaled=True):
            return small_linear_fp8(x, [self.weight], [self.weight_scale_inv], self.act_dtype)[0]
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


def held_in_fp8(name: str) -> bool:
    """Whether the checkpoint tensor `name` is held in FP8 in memory by a quantized model."""
    return fp8.is_quantized(name) and not any(f".{kept}." in name for kept in _KEPT)


def quantize_model_(model: nn.Module) -> nn.Module:
    """Hold `model`'s quantizable weights in FP8, in place, a layer at a time (peak memory: the model
    plus one layer's FP8 copy). Names as in the checkpoint, `model.` dropped."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Experts):
            module.to_fp8_()
            continue
        for child_name, child in list(module.named_children()):
            full = f"model.{name}.{child_name}.weight" if name else f"model.{child_name}.weight"
            if type(child) is nn.Linear and held_in_fp8(full):
                setattr(module, child_name, FP8Linear.from_linear(child))
    device = next(model.parameters()).device
    if device.type != "meta":
        warn_if_unsupported(device)
    return model

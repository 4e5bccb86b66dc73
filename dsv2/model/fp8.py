"""FP8 weights in the block-scaled layout DeepSeek released with V3, which transformers and vLLM read.

A quantized linear weight W [out, in] is stored as `weight` (float8_e4m3fn, same shape) and
`weight_scale_inv` (float32 [ceil(out/128), ceil(in/128)]), one scale per 128 x 128 block, with
    W = weight * weight_scale_inv        (each block times its scale)
and each block's scale its largest |w| / 448, e4m3's largest finite value, so the block's largest
weight lands on it exactly and the rest keep 3 mantissa bits (a relative step of 2^-3, an error of
at most half that: 2^-4 of the value, for values above the block's subnormal range).

Quantized, as in the released V3: every attention projection, and the dense, shared and routed
MLP weights. Kept in the model's dtype: the embeddings, lm_head, every norm and the router's gate
(`is_quantized` says which by name). config.json says so with QUANTIZATION_CONFIG.
"""

from __future__ import annotations

import math
import re

import torch

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [BLOCK, BLOCK]}
SCALE_SUFFIX = "_scale_inv"

_QUANTIZED = re.compile(
    r"^model\.layers\.\d+\.("
    r"self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj)"
    r")\.weight$"
)


class QuantizationError(ValueError):
    """A quantization_config or a quantized tensor that this code cannot honour; says which."""


def is_quantized(name: str) -> bool:
    """Whether the checkpoint tensor `name` is stored in FP8 (with `name + "_scale_inv"`)."""
    return _QUANTIZED.match(name) is not None


def scale_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    out, in_ = shape[-2:]
    return math.ceil(out / BLOCK), math.ceil(in_ / BLOCK)


def check_config(quantization: dict | None) -> str | None:
    """The quantization method a config.json's `quantization_config` names (None: unquantized), after
    checking that it is the layout this module reads."""
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        raise QuantizationError(f"quantization_config must be an object, got {quantization!r}")
    method = quantization.get("quant_method")
    if method != "fp8":
        raise QuantizationError(f"quantization_config.quant_method {method!r} is not supported (only 'fp8')")
    if quantization.get("fmt", "e4m3") != "e4m3":
        raise QuantizationError(f"quantization_config.fmt {quantization['fmt']!r} is not supported (only 'e4m3')")
    block = quantization.get("weight_block_size")
    if list(block or []) != [BLOCK, BLOCK]:
        raise QuantizationError(f"quantization_config.weight_block_size {block!r} is not supported "
                                f"(only [{BLOCK}, {BLOCK}])")
    if quantization.get("activation_scheme", "dynamic") != "dynamic":
        raise QuantizationError(f"quantization_config.activation_scheme {quantization['activation_scheme']!r} "
                                "is not supported (only 'dynamic')")
    return method


def _blocks(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] zero-padded to whole blocks and viewed as [out/B, B, in/B, B]."""
    out, in_ = w.shape
    rows, cols = scale_shape(w.shape)
    padded = torch.nn.functional.pad(w, (0, cols * BLOCK - in_, 0, rows * BLOCK - out))
    return padded.view(rows, BLOCK, cols, BLOCK)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] (any float dtype) -> (weight float8_e4m3fn [out, in], weight_scale_inv float32
    [ceil(out/128), ceil(in/128)]). Computed in float32; an all-zero block gets scale 1."""
    if w.dim() != 2:
        raise QuantizationError(f"FP8 block quantization takes a 2-D weight, got shape {list(w.shape)}")
    blocks = _blocks(w.float())
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out, in_ = w.shape
    return q.view(q.shape[0] * BLOCK, -1)[:out, :in_].contiguous(), scale


def dequantize_experts(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dequantize() of each expert of a stacked [E, out, in] weight with its [E, ., .] scales, or of a 2-D one."""
    if q.dim() == 2:
        return dequantize(q, scale_inv, dtype)
    return torch.stack([dequantize(q[e], scale_inv[e], dtype) for e in range(q.shape[0])])


def dequantize_rows(q: torch.Tensor, scale_inv: torch.Tensor, split: int | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dequantize() for two matrices stacked by rows, each blocked on its own (gate_up_proj: the up
    half's rows start at `split` and its block rows at ceil(split / 128))."""
    if split is None or split % BLOCK == 0:
        return dequantize(q, scale_inv, dtype)
    nb = math.ceil(split / BLOCK)
    return torch.cat([dequantize(q[:split], scale_inv[:nb], dtype), dequantize(q[split:], scale_inv[nb:], dtype)])


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(weight, weight_scale_inv) -> W [out, in] in `dtype`."""
    if q.dim() != 2 or tuple(scale_inv.shape) != scale_shape(q.shape):
        raise QuantizationError(f"weight_scale_inv of shape {list(scale_inv.shape)} does not fit a weight of "
                                f"shape {list(q.shape)} in {BLOCK} x {BLOCK} blocks (want {list(scale_shape(q.shape))})")
    w = _blocks(q.float()) * scale_inv.float()[:, None, :, None]
    out, in_ = q.shape
    return w.view(w.shape[0] * BLOCK, -1)[:out, :in_].to(dtype).contiguous()

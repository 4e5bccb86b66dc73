"""What a config costs: parameters (total and activated per token) and KV-cache bytes per token.

Counts come from the model itself, built on the meta device (no memory), so they cannot drift
from the code. "Activated" is every parameter a token's forward pass computes with: all but the
routed experts it does not pick (N_r - K_r of them per MoE layer) and the embedding table, which
is a lookup, not a matmul. That is the convention under which DeepSeek-V2 has 21B of 236B active.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig
from .model import Transformer

BYTES = {"bf16": 2, "fp8": 1}


def count_params(config: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    idle_experts = 0
    for layer in model.layers:
        if layer.is_moe:
            e = layer.mlp.experts
            per_expert = sum(p[0].numel() for p in (e.gate_proj, e.up_proj, e.down_proj))
            idle_experts += (config.n_routed_experts - config.num_experts_per_tok) * per_expert
    activated = total - idle_experts - (0 if config.tie_word_embeddings else embedding)
    return {"total": total, "activated": activated, "embedding": embedding}


# DeepSeek 67B (the paper's dense baseline) caches 2 x 8 KV heads x 128 x 95 layers per token
DEEPSEEK_67B_KV_ELEMENTS = 2 * 8 * 128 * 95  # 194,560


def cache_kind(config: ModelConfig) -> str:
    """The row of `kv_cache_per_token` that is the model's own cache: "mla", or for attention_type
    "mha" by its key/value heads n_kv: "mha" (one per head), "mqa" (one) or "gqa_{n_kv}_groups"."""
    if config.attention_type == "mla":
        return "mla"
    n_kv = config.num_key_value_heads
    return "mha" if n_kv == config.num_attention_heads else "mqa" if n_kv == 1 else f"gqa_{n_kv}_groups"


def kv_cache_per_token(config: ModelConfig) -> dict[str, dict]:
    """Elements and bytes one token costs in the cache: the model's own attention (MLA, or MHA with
    its key/value heads: MHA, GQA or MQA) beside the MHA/GQA/MQA equivalents of its heads.

    MLA caches c_kv and k_rope, (d_c + d_h^R) per layer; the others follow the paper's table:
    MHA 2 n_h d_h l, GQA 2 n_g d_h l (8 groups shown, and a GQA model's own n_g), MQA 2 d_h l, with
    d_h = qk_nope_head_dim for MLA and an MHA model's own head dim. bytes_bf16/bytes_fp8 count
    elements only; the model's own row (`cache_kind`) has `cache_bytes`, what the engine stores for
    each kv_cache_dtype it supports, scales included (engine/cache.py), with the resulting bits per
    element.
    """
    from .engine.cache import cache_row_bytes

    mla = config.attention_type == "mla"
    layers, n_h = config.num_hidden_layers, config.num_attention_heads
    d_h = config.qk_nope_head_dim if mla else config.qk_rope_head_dim
    own = cache_kind(config)
    elements = {"mha": 2 * n_h * d_h * layers}
    if own.startswith("gqa_"):  # a GQA model's own groups, n_kv key/value heads
        elements[own] = 2 * config.num_key_value_heads * d_h * layers
    elements["gqa_8_groups"] = 2 * min(8, n_h) * d_h * layers
    elements["mqa"] = 2 * d_h * layers
    if mla:  # an MHA-family model's own cache is one of the rows above
        elements = {"mla": sum(config.cache_widths()) * layers, **elements}
    out = {
        kind: {"elements": n, **{f"bytes_{dt}": n * b for dt, b in BYTES.items()}}
        for kind, n in elements.items()
    }
    dtypes = {"bfloat16": torch.bfloat16, **({"fp8": "fp8", "6bit": "6bit"} if mla else {})}
    cache_bytes = {name: layers * cache_row_bytes(config, dt) for name, dt in dtypes.items()}
    out[own]["cache_bytes"] = cache_bytes
    out[own]["cache_bits_per_element"] = {k: round(8 * b / elements[own], 3) for k, b in cache_bytes.items()}
    return out


def kv_cache_vs_deepseek_67b(config: ModelConfig) -> dict[str, float]:
    """The paper's 93.3%: 1 - (MLA elements x 6 bits) / (194,560 x 16 bits), beside the same
    reduction with this engine's real 6-bit and fp8 layouts (scales included)."""
    kv = kv_cache_per_token(config)["mla"]
    base_bits = DEEPSEEK_67B_KV_ELEMENTS * 16
    return {
        "deepseek_67b_elements": DEEPSEEK_67B_KV_ELEMENTS,
        "reduction_paper_6_bits": round(1 - kv["elements"] * 6 / base_bits, 4),
        "reduction_6bit": round(1 - kv["cache_bytes"]["6bit"] * 8 / base_bits, 4),
        "reduction_fp8": round(1 - kv["cache_bytes"]["fp8"] * 8 / base_bits, 4),
        "reduction_bf16": round(1 - kv["cache_bytes"]["bfloat16"] * 8 / base_bits, 4),
    }


GPU_GB = (80, 141)  # H100 / H200
GPU_UTILIZATION = 0.9  # what --gpu-memory-utilization leaves the engine by default


def weight_bytes(config: ModelConfig, quantization: str | None = None) -> dict:
    """Bytes of the weights as a checkpoint stores them for serving: bf16, or with quantization="fp8"
    1 byte for each weight model/fp8.py quantizes plus its fp32 128 x 128 block scales (the rest,
    embeddings, lm_head, norms and the router, stay bf16)."""
    from .checkpoint import checkpoint_tensors
    from .model import fp8

    with torch.device("meta"):
        model = Transformer(config)
    quantized = kept = scales = 0
    for name, t in checkpoint_tensors(model):
        if quantization == "fp8" and fp8.is_quantized(name):
            quantized += t.numel()
            rows, cols = fp8.scale_shape(t.shape)
            scales += rows * cols * 4
        else:
            kept += t.numel() * 2
    total = quantized + kept + scales
    return {"quantization": quantization or "bf16", "bytes": total, "gb": round(total / 1e9, 2),
            "fp8_bytes": quantized, "scale_bytes": scales, "bf16_bytes": kept}


def gpus_needed(config: ModelConfig, weights: int, cache_tokens: int, kv_cache_dtype: str = "bfloat16") -> dict:
    """How many GPUs of each size hold the weights and `cache_tokens` tokens of KV cache at
    GPU_UTILIZATION, split evenly (activations and each GPU's own workspace not counted)."""
    from .engine.cache import cache_row_bytes

    per_token = config.num_hidden_layers * cache_row_bytes(config, torch.bfloat16 if kv_cache_dtype == "bfloat16"
                                                           else kv_cache_dtype)
    need = weights + cache_tokens * per_token
    return {"cache_tokens": cache_tokens, "kv_cache_dtype": kv_cache_dtype, "cache_bytes": cache_tokens * per_token,
            "weights_and_cache_gb": round(need / 1e9, 2),
            "gpus": {f"{gb}GB": max(1, math.ceil(need / (gb * 1e9 * GPU_UTILIZATION))) for gb in GPU_GB}}


def tensor_parallel(config: ModelConfig, size: int, quantization: str | None = None,
                    kv_cache_dtype: str = "bfloat16", data_parallel_attention: bool = False) -> dict:
    """One rank's share of a model split over `size` GPUs (model/tensor_parallel.py): its weight
    bytes (FP8 weights with their scales under quantization="fp8") and the cache tokens that fit
    beside them on each GPU size at GPU_UTILIZATION. Under plain tensor parallelism every rank
    caches every token's latent, so those are the engine's tokens; with data-parallel attention
    each rank caches its own requests' tokens only (but holds attention whole), so the engine holds
    `size` times a rank's."""
    from .engine.cache import cache_row_bytes
    from .model import fp8
    from .model.fp8_layers import quantize_model_
    from .model.tensor_parallel import check_config, shard_

    check_config(config, size, data_parallel_attention)
    with torch.device("meta"):
        model = Transformer(config).to(torch.bfloat16)
        if quantization == "fp8":
            quantize_model_(model)
    shard_(model, layout=(0, size), data_parallel_attention=data_parallel_attention)
    weights = sum(p.numel() * (1 if p.dtype == fp8.FP8 else 4 if p.dtype == torch.float32 else 2)
                  for p in model.parameters())
    per_token = config.num_hidden_layers * cache_row_bytes(config, torch.bfloat16 if kv_cache_dtype == "bfloat16"
                                                           else kv_cache_dtype)
    tokens = {f"{gb}GB": max(0, int((gb * 1e9 * GPU_UTILIZATION - weights) // per_token)) for gb in GPU_GB}
    return {"size": size, "data_parallel_attention": data_parallel_attention,
            "weights_per_rank_gb": round(weights / 1e9, 2), "cache_bytes_per_token_per_rank": per_token,
            "cache_tokens_per_rank": tokens,
            "cache_tokens_engine": {gb: n * size if data_parallel_attention else n for gb, n in tokens.items()}}


def model_info(config: ModelConfig, quantization: str | None = None, cache_tokens: int | None = None,
               kv_cache_dtype: str = "bfloat16", tensor_parallel_size: int | None = None,
               data_parallel_attention: bool = False) -> dict:
    params = count_params(config)
    kv = kv_cache_per_token(config)
    weights = weight_bytes(config, quantization)
    mla_only = {}
    if config.attention_type == "mla":
        mla_only = {
            "mla_vs_mha_cache_ratio": round(kv["mla"]["elements"] / kv["mha"]["elements"], 5),
            "kv_cache_vs_deepseek_67b": kv_cache_vs_deepseek_67b(config),
        }
    return {
        "attention_type": config.attention_type,
        "kv_cache_kind": cache_kind(config),  # the model's own row of kv_cache_per_token
        "parameters": {
            **params,
            "total_billions": round(params["total"] / 1e9, 3),
            "activated_billions": round(params["activated"] / 1e9, 3),
        },
        "kv_cache_per_token": kv,
        **mla_only,
        "layers": config.num_hidden_layers,
        "moe_layers": sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers)),
        "routed_experts": config.n_routed_experts,
        "experts_per_token": config.num_experts_per_tok,
        "shared_experts": config.n_shared_experts,
        "max_position_embeddings": config.max_position_embeddings,
        "weights": weights,
        "memory": gpus_needed(config, weights["bytes"], config.max_position_embeddings if cache_tokens is None
                              else cache_tokens, kv_cache_dtype),
        **({"tensor_parallel": tensor_parallel(config, tensor_parallel_size, quantization, kv_cache_dtype,
                                               data_parallel_attention)}
           if tensor_parallel_size else {}),
    }

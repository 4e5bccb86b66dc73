"""What a config costs: parameters (total and activated per token) and KV-cache bytes per token.

Counts come from the model itself, built on the meta device (no memory), so they cannot drift
from the code. "Activated" is every parameter a token's forward pass computes with: all but the
routed experts it does not pick (N_r - K_r of them per MoE layer) and the embedding table, which
is a lookup, not a matmul. That is the convention under which DeepSeek-V2 has 21B of 236B active.
"""

from __future__ import annotations

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


def kv_cache_per_token(config: ModelConfig) -> dict[str, dict[str, int]]:
    """Elements and bytes one token costs in the cache, MLA against the MHA/GQA/MQA equivalents.

    MLA caches c_kv and k_rope, (d_c + d_h^R) per layer; the others follow the paper's table:
    MHA 2 n_h d_h l, GQA 2 n_g d_h l (8 groups shown), MQA 2 d_h l, with d_h = qk_nope_head_dim.
    """
    layers, d_h, n_h = config.num_hidden_layers, config.qk_nope_head_dim, config.num_attention_heads
    elements = {
        "mla": (config.kv_lora_rank + config.qk_rope_head_dim) * layers,
        "mha": 2 * n_h * d_h * layers,
        "gqa_8_groups": 2 * min(8, n_h) * d_h * layers,
        "mqa": 2 * d_h * layers,
    }
    return {
        kind: {"elements": n, **{f"bytes_{dt}": n * b for dt, b in BYTES.items()}}
        for kind, n in elements.items()
    }


def model_info(config: ModelConfig) -> dict:
    params = count_params(config)
    kv = kv_cache_per_token(config)
    return {
        "parameters": {
            **params,
            "total_billions": round(params["total"] / 1e9, 3),
            "activated_billions": round(params["activated"] / 1e9, 3),
        },
        "kv_cache_per_token": kv,
        "mla_vs_mha_cache_ratio": round(kv["mla"]["elements"] / kv["mha"]["elements"], 5),
        "layers": config.num_hidden_layers,
        "moe_layers": sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers)),
        "routed_experts": config.n_routed_experts,
        "experts_per_token": config.num_experts_per_tok,
        "shared_experts": config.n_shared_experts,
        "max_position_embeddings": config.max_position_embeddings,
    }

"""Dense multi-head attention as DeepSeek LLM (LLaMA's architecture) has it: the paper's baseline.

Every head has its own key and value, so a token caches 2 n_h d_h numbers per layer (8,192 for
DeepSeek LLM 7B against MLA's 576): the cost MLA exists to remove. The module speaks the same cache
protocol as MLA, with the rotated keys and the values of all key/value heads, [B, S, n_kv d_h] each,
in the places of c_kv and k_rope; so the contiguous and paged caches, reference generation and the
engine run it unchanged.

With num_key_value_heads n_kv < n_h it is grouped-query attention (GQA; n_kv = 1 is multi-query,
MQA), the paper's other baselines, as LLaMA defines them: k_proj and v_proj make n_kv heads, query
head h reads key/value head h // (n_h / n_kv), and only those n_kv heads are cached, 2 n_kv d_h
numbers per token per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import LayerCache
from .rope import apply_rope_rotate_half

# SDPA's enable_gqa (torch 2.5+) lets a group of query heads read one key/value head in place
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class MHA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.n_heads
        self.softmax_scale = self.head_dim ** -0.5
        d, hd, bias = config.hidden_size, self.n_heads * self.head_dim, config.attention_bias
        kvd = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, hd, bias=bias)
        self.k_proj = nn.Linear(d, kvd, bias=bias)
        self.v_proj = nn.Linear(d, kvd, bias=bias)
        self.o_proj = nn.Linear(hd, d, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        absorb: bool = False,
    ) -> torch.Tensor:
        """x [B, S, d]; mask [B, 1, S, T] bool (True = attend) or None for plain causal over S.
        `absorb` is MLA's switch and means nothing here: MHA has no projection to fold."""
        kv_heads = (self.n_kv_heads, self.head_dim)
        q = apply_rope_rotate_half(self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim)), cos, sin)
        k = apply_rope_rotate_half(self.k_proj(x).unflatten(-1, kv_heads), cos, sin).flatten(-2)  # [B, S, Hkv*D]
        v = self.v_proj(x)
        if x.shape[1] == 1 and getattr(cache, "decode_kernel", False):
            # one decode token per row: the cache's kernel attends straight over its pages
            cache.store(k, v)
            o = cache.decode_attention_mha(q[:, 0], self.softmax_scale)  # [B, H, D] fp32
            return self.o_proj(o.to(x.dtype).flatten(-2))[:, None]
        if cache is not None:
            k, v = cache.write(k, v)  # every cached token, [B, T, Hkv*D]
        k, v = k.unflatten(-1, kv_heads).transpose(1, 2), v.unflatten(-1, kv_heads).transpose(1, 2)
        group = self.n_heads // self.n_kv_heads
        gqa = group > 1 and _SDPA_GQA and mask is None
        if group > 1 and not gqa:
            # query head h reads kv head h // group. With a mask, CUDA's enable_gqa falls back to the
            # math kernel on some torch versions (transformers avoids it there too): expand instead
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale,
            **({"enable_gqa": True} if gqa else {}),
        )
        return self.o_proj(o.transpose(1, 2).flatten(-2))

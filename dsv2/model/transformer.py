"""The DeepSeek-V2 decoder: embeddings, MLA + (dense or MoE) blocks, final norm, LM head.

Module names follow the released checkpoint (`embed_tokens`, `layers.N.self_attn.kv_b_proj`, ...),
so the checkpoint maps onto parameters by dropping the `model.` prefix and (un)stacking experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import ModelConfig
from .attention import MLA
from .cache import LatentCache
from .kernels.small_linear import linears
from .mha import MHA
from .moe import MLP, MoE, RouterOutput, TokenDropping
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, vocab]
    router: list[RouterOutput]  # one per MoE layer, in layer order


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = (MHA if config.attention_type == "mha" else MLA)(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h, cos, sin, mask=None, cache=None, absorb=False,
                drop: TokenDropping | None = None) -> tuple[torch.Tensor, RouterOutput | None]:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, absorb)
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            return self.mlp(x, drop, residual=h)
        return h + self.mlp(x), None


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        slots: torch.Tensor | None = None,
        return_router: bool = False,
        absorb: bool = False,
        drop: TokenDropping | None = None,
        checkpoint_layers: bool = False,
        output_index: torch.Tensor | None = None,
    ) -> torch.Tensor | ModelOutput:
        """tokens [B, S] -> logits [B, S, vocab] (with return_router, a ModelOutput).

        attention_mask [B, S] marks real tokens (False = padding). Without a cache, positions
        default to each row's count of real tokens so far. With a cache, `positions` and `slots`
        (where each token's latent is stored) are given by the caller. `drop` applies the MoE
        capacity limit (training only); `checkpoint_layers` recomputes each block's activations in
        the backward pass instead of keeping them. `output_index` [B] picks one position per row
        whose logits are computed, [B, vocab]: all an inference step samples from ([B, K]: K
        positions per row, [B, K, vocab], what a scorer of continuations needs).
        """
        h, cos, sin, mask = self.embed(tokens, positions, attention_mask, cache, slots)
        routes: list[RouterOutput] = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layer(i)
            if checkpoint_layers and self.training:
                h, route = torch.utils.checkpoint.checkpoint(
                    layer, h, cos, sin, mask, layer_cache, absorb, drop, use_reentrant=False)
            else:
                h, route = layer(h, cos, sin, mask, layer_cache, absorb, drop)
            if route is not None:
                routes.append(route)
        logits = self.logits(h, output_index)
        return ModelOutput(logits, routes) if return_router else logits

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, cache: LatentCache | None = None,
              slots: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """What the first block takes (see `forward`): the stream h [B, S, d], the rotation cos and
        sin, the attention mask; a cache claims `slots` here. Blocks then take layer i's part of
        the cache, `cache.layer(i)`."""
        valid = attention_mask.bool() if attention_mask is not None else None
        if positions is None:
            if cache is not None:
                raise ValueError("a cached forward needs explicit positions")
            positions = _default_positions(tokens, valid)
        if cache is not None:
            if slots is None:
                raise ValueError("a cached forward needs the slots its tokens are written to")
            if valid is None:
                valid = torch.ones_like(tokens, dtype=torch.bool)
            mask = cache.begin(positions, valid, slots)
        else:
            mask = None if valid is None else _padded_causal_mask(valid)
        cos, sin = self.rotary(positions)
        h = self.embed_tokens(tokens)
        if torch.is_autocast_enabled(h.device.type):
            # the residual stream in the autocast dtype (bf16), as with bf16 parameters: fp32 master
            # weights stay in the optimizer, and no fp32 activations are cast at every matmul
            h = h.to(torch.get_autocast_dtype(h.device.type))
        return h, cos, sin, mask

    def logits(self, h: torch.Tensor, output_index: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's stream -> logits, at every position or at `output_index` of each row:
        [B] (one position each, [B, vocab]) or [B, K] (K each, [B, K, vocab])."""
        if output_index is not None:
            rows = torch.arange(h.shape[0], device=h.device)
            h = h[rows if output_index.dim() == 1 else rows[:, None], output_index]
        return linears(self.norm(h), self.lm_head)[0]

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, std) for every matrix (the paper's 0.006 by default config), ones for norms."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        self.rotary.reset_parameters()


def _default_positions(tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def _padded_causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S]: causal over real tokens; a padding query sees only itself (keeps softmax finite)."""
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    mask = causal & valid[:, None, :]
    eye = torch.eye(s, dtype=torch.bool, device=valid.device)
    return (mask | (eye & ~valid[:, :, None]))[:, None]

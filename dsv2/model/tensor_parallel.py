"""Tensor and expert parallelism for inference: one model split over the ranks of a process group.

The unchanged model is cut in place, module by module, and each cut that leaves a rank with a
partial sum gets a forward hook that all-reduces it:

| part | each of N ranks holds | after it |
|---|---|---|
| embed_tokens | vocabulary rows r*V/N .. (r+1)*V/N (others' tokens embed as zeros) | all-reduce |
| MLA q_proj / q_b_proj, kv_b_proj | heads r*H/N .. (r+1)*H/N (their rows) | - |
| MLA q_a_proj, kv_a_proj_with_mqa, norms | everything (small; the latent cache is every rank's) | - |
| MLA o_proj | the same heads' input columns | all-reduce of the attention output |
| routed experts | experts r*E/N .. (r+1)*E/N (expert parallel) | - |
| shared experts, dense MLPs | rows of gate/up, columns of down, 1/N of the width | all-reduce of the layer output |
| router gate, final norm | everything | - |
| lm_head | vocabulary rows r*V/N .. | all-gather of the logits |

With `n_group` = N, the paper's device-limited routing holds as it does in training: group g's
experts are rank g's, so a token reaches at most `topk_group` ranks. A MoE layer sums its routed
and shared parts in one all-reduce, the residual added on rank 0 only. Every rank computes the
latent (kv_a_proj is replicated) and so holds every token's latent in its cache: the cache does
not shrink with N, only the weights do (docs/parallel.md).

Data-parallel attention (`data_parallel_attention=True`, SGLang's answer to that cache): every
rank holds the whole model but its routed experts (E/N of them, as above) and 1/N of the shared
experts' width, and runs attention, dense MLPs and the head for its own requests over its own cache.
Each MoE layer gathers every rank's tokens, routes them all, runs this rank's experts and its slice
of the shared experts on them, and reduce-scatters the partial sums back to the tokens' ranks,
where the residual is added. The cache then holds each token once across the ranks: N times the
sequences of plain tensor parallelism (engine/data_parallel.py runs the ranks in step).

`shard_` records what part of each full parameter a rank holds (`Shard`), so that `load_model`
reads just those slices from the checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import fp8
from .kernels.small_linear import small_linear
from .moe import MLP, Experts, MoE


@dataclass(frozen=True)
class Shard:
    """The part of a full parameter a rank holds: indices start .. stop - 1 of dimension `dim`."""

    dim: int
    start: int
    stop: int

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t.narrow(self.dim, self.start, self.stop - self.start)

    def blocks(self, full: int, name: str) -> Shard:
        """The same part of a 2-D FP8 weight's block scales (the cut must fall on block edges)."""
        if self.start % fp8.BLOCK or (self.stop % fp8.BLOCK and self.stop != full):
            raise ValueError(f"{name}: FP8 blocks of {fp8.BLOCK} do not split at {self.start}..{self.stop}")
        return Shard(self.dim, self.start // fp8.BLOCK, -(-self.stop // fp8.BLOCK))


def check_config(config: ModelConfig, size: int, data_parallel_attention: bool = False) -> None:
    """Raise ValueError naming the setting that does not split over `size` ranks."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {size}")
    needs = {}
    if not data_parallel_attention:  # the heads, the vocabulary and the dense MLPs are split too
        if config.attention_type != "mla":
            raise ValueError("tensor parallelism splits MLA's heads: the MHA baseline runs on one device")
        needs = {"num_attention_heads": config.num_attention_heads, "vocab_size": config.vocab_size,
                 "intermediate_size": config.intermediate_size}
    if config.n_routed_experts:
        needs["n_routed_experts"] = config.n_routed_experts
        if config.n_shared_experts:
            needs["n_shared_experts x moe_intermediate_size"] = config.n_shared_experts * config.moe_intermediate_size
    for name, value in needs.items():
        if value % size:
            raise ValueError(f"{name} = {value} does not split over tensor_parallel_size {size}")


def _reduce(group):
    def hook(module, args, out):
        if isinstance(out, tuple):  # MoE: (output, routing)
            return (_all_reduce(out[0], group), *out[1:])
        return _all_reduce(out, group)
    return hook


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(t, group=group)
    return t


def _residual_on_rank0_only(module, args, kwargs):
    # a MoE layer returns residual + its part on every rank: the sum must count the residual once
    return args, {**kwargs, "residual": None}


def _narrow(module: nn.Module, name: str, shard: Shard, prefix: str, held: dict[str, Shard]) -> None:
    """Keep `shard` of module.name (and the same part of its FP8 block scales)."""
    p = getattr(module, name)
    setattr(module, name, nn.Parameter(shard.take(p.detach()).clone(), requires_grad=False))
    held[prefix + name] = shard
    scale = getattr(module, name + fp8.SCALE_SUFFIX, None)
    if scale is not None:
        blocks = shard.blocks(p.shape[shard.dim], prefix + name)
        setattr(module, name + fp8.SCALE_SUFFIX, nn.Parameter(blocks.take(scale.detach()).clone(), requires_grad=False))


def _split(size: int, rank: int, total: int, unit: int = 1) -> Shard:
    per = total // size * unit
    return Shard(0, rank * per, (rank + 1) * per)


def _cols(s: Shard) -> Shard:
    return Shard(1, s.start, s.stop)


class VocabParallelEmbedding(nn.Module):
    """Rows start .. stop - 1 of the embedding: other tokens embed as zeros here, and the all-reduce
    (a hook) adds the rank that holds them."""

    def __init__(self, embedding: nn.Embedding, shard: Shard):
        super().__init__()
        self.start, self.stop = shard.start, shard.stop
        self.weight = nn.Parameter(embedding.weight.detach()[shard.start:shard.stop].clone(), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mine = (tokens >= self.start) & (tokens < self.stop)
        h = F.embedding(torch.where(mine, tokens - self.start, 0), self.weight)
        return h * mine[..., None].to(h.dtype)


class VocabParallelHead(nn.Module):
    """lm_head's rows start .. stop - 1: each rank's logits, gathered along the vocabulary."""

    fusable = False  # `linears` calls it as a module: the gather is part of its forward
    bias = None

    def __init__(self, head: nn.Linear, shard: Shard, group, size: int):
        super().__init__()
        self.group, self.size = group, size
        self.weight = nn.Parameter(shard.take(head.weight.detach()).clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = small_linear(x, self.weight)[0].contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)


class LocalExperts(Experts):
    """Experts start .. stop - 1 of a MoE layer, called with the routing over all of them: the other
    ranks' assignments are sorted past this rank's experts, left out of the GEMMs and weigh nothing."""

    fusable = False  # the fused decode kernels index all of a layer's experts

    def __init__(self, experts: Experts, shard: Shard):
        with torch.device("meta"):
            super().__init__(shard.stop - shard.start, experts.down_proj.shape[1], experts.inter_dim)
        self.start = shard.start
        for name in ("gate_up_proj", "down_proj"):
            for suffix in ("", fp8.SCALE_SUFFIX):
                full = getattr(experts, name + suffix)
                if full is not None:
                    setattr(self, name + suffix, nn.Parameter(full.detach()[shard.start:shard.stop].clone(),
                                                              requires_grad=False))

    def forward(self, x, topk_idx, topk_weight, kept=None):
        n, k = topk_idx.shape
        mine = (topk_idx >= self.start) & (topk_idx < self.start + self.n_experts)
        if kept is not None:
            mine = mine & kept
        # others' assignments take the id past the last local expert: sorted to the end, uncounted
        flat = torch.where(mine, topk_idx - self.start, self.n_experts).flatten()
        order, counts = self._sort(flat)
        y = self._ffn(x[order // k], counts)
        where = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=x.device))
        y = y[where].view(n, k, -1).float() * topk_weight[..., None]
        return torch.where(mine[..., None], y, 0.0).sum(1).to(x.dtype)


def shard_(model: nn.Module, group=None, layout: tuple[int, int] | None = None,
           data_parallel_attention: bool = False) -> dict[str, Shard]:
    """Cut `model` (a Transformer, real or on the meta device) into this rank's part of `group` in
    place and hook in the collectives; returns {parameter name: the part of the full one held}.
    `layout` (rank, size) instead of a group: a meta model's part, to count it (`dsv2 info`).
    `data_parallel_attention`: only the MoE layers are split, their tokens exchanged (above)."""
    rank, size = layout or (dist.get_rank(group), dist.get_world_size(group))
    config: ModelConfig = model.config
    check_config(config, size, data_parallel_attention)
    if data_parallel_attention:
        return _shard_moe_layers(model, group, rank, size)
    held: dict[str, Shard] = {}
    vocab = _split(size, rank, config.vocab_size)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, vocab)
    held["embed_tokens.weight"] = vocab
    model.embed_tokens.register_forward_hook(_reduce(group))
    model.lm_head = VocabParallelHead(model.lm_head, vocab, group, size)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        held["lm_head.weight"] = vocab
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}."
        attn = block.self_attn
        q = _split(size, rank, config.num_attention_heads, config.qk_head_dim)
        q_proj = "q_proj" if attn.q_lora_rank is None else "q_b_proj"
        _narrow(getattr(attn, q_proj), "weight", q, f"{prefix}self_attn.{q_proj}.", held)
        kv = _split(size, rank, config.num_attention_heads, config.qk_nope_head_dim + config.v_head_dim)
        _narrow(attn.kv_b_proj, "weight", kv, f"{prefix}self_attn.kv_b_proj.", held)
        o = _split(size, rank, config.num_attention_heads, config.v_head_dim)
        _narrow(attn.o_proj, "weight", _cols(o), f"{prefix}self_attn.o_proj.", held)
        if attn.o_proj.bias is not None and rank:
            with torch.no_grad():
                attn.o_proj.bias.zero_()  # added once, by rank 0, to the reduced output
        attn.n_heads = config.num_attention_heads // size
        attn.register_forward_hook(_reduce(group))
        mlp = block.mlp
        if isinstance(mlp, MoE):
            experts = _split(size, rank, config.n_routed_experts)
            mlp.experts = LocalExperts(mlp.experts, experts)
            for name in ("gate_up_proj", "down_proj"):
                held[f"{prefix}mlp.experts.{name}"] = experts
            if mlp.shared_experts is not None:
                _shard_mlp(mlp.shared_experts, size, rank, f"{prefix}mlp.shared_experts.", held)
            if rank:
                mlp.register_forward_pre_hook(_residual_on_rank0_only, with_kwargs=True)
        else:
            _shard_mlp(mlp, size, rank, f"{prefix}mlp.", held)
        mlp.register_forward_hook(_reduce(group))
    return held


def _shard_moe_layers(model: nn.Module, group, rank: int, size: int) -> dict[str, Shard]:
    """Data-parallel attention's cut: each MoE layer's experts split, its tokens exchanged."""
    held: dict[str, Shard] = {}
    exchange = TokenExchange(group, rank, size)
    for i, block in enumerate(model.layers):
        mlp = block.mlp
        if not isinstance(mlp, MoE):
            continue
        prefix = f"layers.{i}."
        experts = _split(size, rank, model.config.n_routed_experts)
        mlp.experts = LocalExperts(mlp.experts, experts)
        for name in ("gate_up_proj", "down_proj"):
            held[f"{prefix}mlp.experts.{name}"] = experts
        if mlp.shared_experts is not None:
            _shard_mlp(mlp.shared_experts, size, rank, f"{prefix}mlp.shared_experts.", held)
        mlp.register_forward_pre_hook(exchange.gather, with_kwargs=True)
        mlp.register_forward_hook(exchange.scatter)
    # every layer of a forward exchanges the same token counts, learnt at its first MoE layer; a
    # forward (whole, or the engine's by its parts) starts by embedding its tokens
    model.embed_tokens.register_forward_pre_hook(exchange.new_forward)
    return held


class TokenExchange:
    """The hooks around a MoE layer under data-parallel attention: before it, every rank's tokens
    gathered (each rank's rows padded to the most any rank has, as all_gather needs equal parts);
    after it, the partial sums reduce-scattered back to their rank, the residual added there."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.counts: list[int] | None = None
        self._saved: list[tuple] = []

    def new_forward(self, module, args) -> None:
        self.counts = None

    def _counts(self, n: int, device: torch.device) -> list[int]:
        if self.counts is None:
            mine = torch.tensor([n], device=device)
            every = torch.empty(self.size, dtype=mine.dtype, device=device)
            dist.all_gather_into_tensor(every, mine, group=self.group)
            self.counts = every.tolist()
        if self.counts[self.rank] != n:
            raise RuntimeError(f"a MoE layer got {n} tokens where this forward's first had {self.counts[self.rank]}")
        return self.counts

    def gather(self, module, args, kwargs):
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        counts = self._counts(flat.shape[0], x.device)
        most = max(counts)
        padded = flat.new_zeros(most, flat.shape[1])
        padded[: flat.shape[0]] = flat
        every = flat.new_empty(self.size * most, flat.shape[1])
        dist.all_gather_into_tensor(every, padded, group=self.group)
        rows = torch.cat([torch.arange(r * most, r * most + c, device=x.device) for r, c in enumerate(counts)])
        self._saved.append((x.shape, rows, kwargs.get("residual")))
        return (every[rows][None],), {**kwargs, "residual": None}

    def scatter(self, module, args, out):
        y, route = out
        shape, rows, residual = self._saved.pop()
        most = max(self.counts)
        padded = y.new_zeros(self.size * most, y.shape[-1])
        padded[rows] = y.reshape(-1, y.shape[-1])
        mine = y.new_empty(most, y.shape[-1])
        dist.reduce_scatter_tensor(mine, padded, group=self.group)
        n = self.counts[self.rank]
        y = mine[:n].view(shape)
        start = sum(self.counts[: self.rank])
        route = dataclasses.replace(route, **{f.name: getattr(route, f.name)[start:start + n]
                                              for f in dataclasses.fields(route) if getattr(route, f.name) is not None})
        return (y if residual is None else residual + y), route


def _shard_mlp(mlp: MLP, size: int, rank: int, prefix: str, held: dict[str, Shard]) -> None:
    width = _split(size, rank, mlp.gate_proj.weight.shape[0])
    _narrow(mlp.gate_proj, "weight", width, f"{prefix}gate_proj.", held)
    _narrow(mlp.up_proj, "weight", width, f"{prefix}up_proj.", held)
    _narrow(mlp.down_proj, "weight", _cols(width), f"{prefix}down_proj.", held)

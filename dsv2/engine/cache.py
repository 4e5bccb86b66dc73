"""The paged latent KV cache and its block manager (vLLM / nano-vllm style, for MLA).

MLA caches per token per layer only c_kv (kv_lora_rank) and k_rope (qk_rope_head_dim): 576 numbers
for the released models, against 2 x heads x head_dim for MHA. Tokens live in fixed-size pages
("blocks"); a sequence's block table lists its pages in order, so token p sits in slot
table[p // block_size] * block_size + p % block_size.

`PagedLatentCache` is the memory; `BlockManager` decides which blocks a sequence owns and shares
full blocks between sequences with the same prefix (prefix caching). The one invariant that makes
sharing safe: the engine only ever writes KV into a block it holds alone. Shared blocks are full,
registered blocks that nobody writes again; `allocate` keeps the token it must recompute out of
them (see there).

The cache may store latents quantized ("fp8", "6bit": the paper serves DeepSeek-V2 with ~6 bits per
element); the layouts and their bit costs are described above `PagedLatentCache`.

The dense MHA baseline (DeepSeek LLM) uses the same pages with a wider row: its rotated keys and
values of every key/value head, 2 n_kv d_h numbers (8,192 for the 7B model; n_kv < n_h under GQA,
1 under MQA), unquantized.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..config import ModelConfig

# --- quantized latents ----------------------------------------------------------------------------
# The paper serves DeepSeek-V2 with the KV cache "quantized to about 6 bits per element on average".
# Two layouts here, per token per layer, for the 576-wide row of V2 (512 latent + 64 rope):
#
#   "fp8":  c_kv as float8_e4m3fn with one fp32 scale (amax / 448); k_rope kept in bf16, because
#           its 64 numbers carry the position (RoPE) and cost little.
#           512 x 8 + 32 + 64 x 16 = 5,152 bits = 644 bytes: 8.94 bits per element.
#   "6bit": c_kv as signed 6-bit integers in [-31, 31], groups of 64 with one bf16 scale each
#           (amax / 31), packed 4 values in 3 bytes; k_rope as float8_e4m3fn with one bf16 scale.
#           512 x 6 + 8 x 16 + 64 x 8 + 16 = 3,728 bits = 466 bytes: 6.47 bits per element.
#
# Scales are rounded to their storage dtype before quantizing, so dequantization uses exactly the
# scale the values were divided by. Quantization is symmetric: zero stays exactly zero.

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT6_MAX = 31  # symmetric signed 6-bit range [-31, 31]; stored biased by 32 in [1, 63]
INT6_GROUP = 64
QUANTIZED = ("fp8", "6bit")
_TINY = 1e-30  # scale floor: an all-zero row or group divides by this, not by 0


def int6_group(kv_lora_rank: int) -> int:
    """Group size for 6-bit c_kv: 64, or the largest divisor of kv_lora_rank below it."""
    return math.gcd(INT6_GROUP, kv_lora_rank)


def latent_fields(kv_lora_rank: int, rope_dim: int, kv_dtype: torch.dtype | str
                  ) -> dict[str, tuple[int, torch.dtype]]:
    """What one token stores per layer: field -> (numbers, dtype). A torch dtype is the plain,
    unquantized row (latent then rope in one tensor)."""
    r, dr = kv_lora_rank, rope_dim
    if isinstance(kv_dtype, torch.dtype):
        return {"kv": (r + dr, kv_dtype)}
    if kv_dtype == "fp8":
        return {"c_kv": (r, torch.float8_e4m3fn), "c_kv_scale": (1, torch.float32), "k_rope": (dr, torch.bfloat16)}
    if kv_dtype == "6bit":
        if r % 4:
            raise ValueError(f"6-bit packing needs kv_lora_rank divisible by 4, got {r}")
        return {"c_kv": (r * 3 // 4, torch.uint8), "c_kv_scale": (r // int6_group(r), torch.bfloat16),
                "k_rope": (dr, torch.float8_e4m3fn), "k_rope_scale": (1, torch.bfloat16)}
    raise ValueError(f"kv cache dtype {kv_dtype!r}: expected a torch dtype or one of {', '.join(QUANTIZED)}")


def latent_row_bytes(kv_lora_rank: int, rope_dim: int, kv_dtype: torch.dtype | str) -> int:
    """Bytes one token costs per layer, scales included."""
    return sum(n * dt.itemsize for n, dt in latent_fields(kv_lora_rank, rope_dim, kv_dtype).values())


def cache_fields(config: ModelConfig, kv_dtype: torch.dtype | str) -> dict[str, tuple[int, torch.dtype]]:
    """`latent_fields` of a model's cache row (`ModelConfig.cache_widths`)."""
    if not isinstance(kv_dtype, torch.dtype) and config.attention_type != "mla":
        # the layouts quantize MLA's latent and keep its rope part apart; MHA has neither
        raise ValueError(f"kv cache dtype {kv_dtype!r} is for MLA's latent cache; an "
                         f"{config.attention_type!r} model's cache stores a torch dtype")
    return latent_fields(*config.cache_widths(), kv_dtype)


def cache_row_bytes(config: ModelConfig, kv_dtype: torch.dtype | str) -> int:
    """Bytes one token costs per layer in a model's cache, scales included."""
    return sum(n * dt.itemsize for n, dt in cache_fields(config, kv_dtype).values())


def quantize_fp8(x: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (float8_e4m3fn [..., n], scale [..., 1]) with one scale per row: amax / 448."""
    x = x.float()
    scale = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=_TINY).to(scale_dtype)
    # clamp before the cast: float8_e4m3fn has no inf and turns overflow into NaN
    q = (x / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def pack_int6(q: torch.Tensor) -> torch.Tensor:
    """Integers in [-32, 31], [..., n] with n % 4 == 0 -> uint8 [..., 3n/4]: 4 values per 3 bytes."""
    u = (q.to(torch.int32) + 32).unflatten(-1, (-1, 4))
    w = u[..., 0] | (u[..., 1] << 6) | (u[..., 2] << 12) | (u[..., 3] << 18)  # 24 bits
    return torch.stack([w & 255, (w >> 8) & 255, w >> 16], dim=-1).flatten(-2).to(torch.uint8)


def unpack_int6(b: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int6 -> int32 [..., 4m/3]."""
    b = b.to(torch.int32).unflatten(-1, (-1, 3))
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    return torch.stack([(w >> s) & 63 for s in (0, 6, 12, 18)], dim=-1).flatten(-2) - 32


def quantize_int6(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (packed uint8 [..., 3n/4], bf16 scale [..., n / group]); one scale per group
    of `group` consecutive numbers: amax / 31, so the rounding error is at most half a step."""
    g = x.float().unflatten(-1, (-1, group))
    scale = (g.abs().amax(-1, keepdim=True) / INT6_MAX).clamp(min=_TINY).bfloat16()
    q = torch.round(g / scale.float()).clamp(-INT6_MAX, INT6_MAX).flatten(-2)
    return pack_int6(q), scale.squeeze(-1)


def dequantize_int6(packed: torch.Tensor, scale: torch.Tensor, group: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int6(packed).float().unflatten(-1, (-1, group))
    return (q * scale.float()[..., None]).flatten(-2).to(dtype)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """float8 tensors as bytes: CPU index_copy_ has no float8 kernel, and a copy is a copy."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn,) else t


# The plain layout's write as a custom op: torch.compile (the engine's compiled steps) then treats it
# as one opaque in-place call on the cache instead of functionalizing it into a copy of the cache.
@torch.library.custom_op("dsv2::store_rows", mutates_args=("kv",))
def store_rows(kv: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """kv [blocks, block_size, width], one layer's pages: token i's row goes to slot slots[i]."""
    kv.view(-1, kv.shape[-1]).index_copy_(0, slots, rows.to(kv.dtype))


@store_rows.register_fake
def _(kv, slots, rows) -> None:
    return None


class PagedLatentCache:
    """Per token per layer one latent row, c_kv then k_rope, stored by `kv_dtype`:

    - a torch dtype: kv [layers, blocks, block_size, kv_lora_rank + qk_rope_head_dim], one
      contiguous row so a decode kernel reads one 576-wide row per key;
    - "fp8" or "6bit": the quantized fields of `latent_fields` (see the layouts above), each
      [layers, blocks, block_size, n] in `store`; `write` quantizes, `gather` dequantizes.
    Either way `gather` returns the dtype of the latest write (the model's compute dtype), so the
    rest of the engine is unchanged whatever the cache stores.

    For an MHA model (torch dtypes only) the two parts are its keys and values: `kv_lora_rank` and
    `rope_dim` both hold n_kv d_h (its key/value heads: all n_h, or fewer under GQA/MQA), a row of
    `kv` is k of every key/value head then v of every one (what kernels/mha_decode.py reads),
    `c_kv()`/`k_rope()` view the keys/values, and `write`/`gather` take and return (k, v)
    [.., n_kv d_h] in the places of (c_kv, k_rope).
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 64, device=None,
                 dtype: torch.dtype | str = torch.bfloat16):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_lora_rank, self.rope_dim = config.cache_widths()
        self.width = self.kv_lora_rank + self.rope_dim
        self.kv_dtype = dtype
        self.quantized = not isinstance(dtype, torch.dtype)
        fields = cache_fields(config, dtype)
        # zeros, not empty: a block's unwritten slots are read (then masked) by gather and kernels,
        # and uninitialised memory may hold NaNs that survive a multiplicative mask
        self.store = {name: torch.zeros(config.num_hidden_layers, num_blocks, block_size, n, device=device, dtype=dt)
                      for name, (n, dt) in fields.items()}
        self.kv = self.store.get("kv")  # the plain layout; None when quantized
        self.compute_dtype = torch.float32 if self.quantized else dtype  # until the first write
        self.group = int6_group(self.kv_lora_rank)

    def c_kv(self, layer: int) -> torch.Tensor:
        """[blocks, block_size, kv_lora_rank], a view (plain layout only)."""
        return self._plain()[layer, ..., : self.kv_lora_rank]

    def k_rope(self, layer: int) -> torch.Tensor:
        """[blocks, block_size, qk_rope_head_dim], a view (plain layout only)."""
        return self._plain()[layer, ..., self.kv_lora_rank:]

    def _plain(self) -> torch.Tensor:
        if self.kv is None:
            raise TypeError(f"a {self.kv_dtype} cache has no plain view; gather dequantizes")
        return self.kv

    def quantize(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> dict[str, torch.Tensor]:
        """c_kv [n, r], k_rope [n, dr] -> the stored fields, each [n, numbers]."""
        if self.kv_dtype == "fp8":
            q, s = quantize_fp8(c_kv)
            return {"c_kv": q, "c_kv_scale": s, "k_rope": k_rope.bfloat16()}
        q, s = quantize_int6(c_kv, self.group)
        qr, sr = quantize_fp8(k_rope, torch.bfloat16)
        return {"c_kv": q, "c_kv_scale": s, "k_rope": qr, "k_rope_scale": sr}

    def dequantize(self, f: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_dtype == "fp8":
            return dequantize_fp8(f["c_kv"], f["c_kv_scale"], dtype), f["k_rope"].to(dtype)
        return (dequantize_int6(f["c_kv"], f["c_kv_scale"], self.group, dtype),
                dequantize_fp8(f["k_rope"], f["k_rope_scale"], dtype))

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """One layer's stored fields (`store`'s names), views [blocks, block_size, n]."""
        return {name: x[layer] for name, x in self.store.items()}

    def write(self, layer: int, slots: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Store token i's latent and rope key in slot slots[i] (block_id * block_size + offset)."""
        self.compute_dtype = c_kv.dtype
        self.write_fields(self.layer(layer), slots, c_kv, k_rope)

    def write_fields(self, fields: dict[str, torch.Tensor], slots: torch.Tensor, c_kv: torch.Tensor,
                     k_rope: torch.Tensor) -> None:
        """`write` into one layer's `fields`."""
        if not self.quantized:
            store_rows(fields["kv"], slots, torch.cat([c_kv, k_rope], dim=-1))
            return
        for name, value in self.quantize(c_kv, k_rope).items():
            rows = fields[name].view(-1, value.shape[-1])
            _raw(rows).index_copy_(0, slots, _raw(value.to(rows.dtype)))

    def gather(self, layer: int, block_table: torch.Tensor, lengths: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """block_table [B, max_blocks] (-1 pads), lengths [B] -> c_kv [B, T, r], k_rope [B, T, dr]
        with T = max_blocks * block_size, in the dtype of the latest write: the slow, obviously
        right twin of a paged decode kernel. Positions at or past a row's length must still be
        masked by the caller; they are zeroed here so a block's previous owner never shows through."""
        return self.gather_fields(self.layer(layer), block_table, lengths, self.compute_dtype)

    def gather_fields(self, fields: dict[str, torch.Tensor], block_table: torch.Tensor, lengths: torch.Tensor,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`gather` from one layer's `fields`, returned in `dtype`."""
        b, m = block_table.shape
        t = m * self.block_size
        idx = block_table.clamp(min=0)
        past = torch.arange(t, device=block_table.device)[None, :] >= lengths[:, None]
        if not self.quantized:
            kv = fields["kv"][idx].reshape(b, t, self.width).masked_fill(past[..., None], 0)
            kv = kv.to(dtype)  # a bf16 cache under an fp32 model: attend in fp32
            return kv[..., : self.kv_lora_rank], kv[..., self.kv_lora_rank:]
        c_kv, k_rope = self.dequantize({name: x[idx].reshape(b, t, -1) for name, x in fields.items()}, dtype)
        return c_kv.masked_fill(past[..., None], 0), k_rope.masked_fill(past[..., None], 0)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.store.values())

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int = 64, dtype: torch.dtype | str = torch.bfloat16) -> int:
        return config.num_hidden_layers * block_size * cache_row_bytes(config, dtype)

    @staticmethod
    def num_blocks_for(config: ModelConfig, free_bytes: int, block_size: int = 64,
                       dtype: torch.dtype | str = torch.bfloat16) -> int:
        return int(free_bytes) // PagedLatentCache.bytes_per_block(config, block_size, dtype)


def block_hash(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """sha256 of (parent block's hash, this block's token ids as little-endian int64).

    Chained, so a block matches only when everything before it matches too (its KV depends on the
    whole prefix). hashlib, not hash(): stable across processes and PYTHONHASHSEED. The first
    block's parent is 32 zero bytes so every input has the same fixed-width layout."""
    h = hashlib.sha256(parent if parent is not None else bytes(32))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


class OutOfBlocks(RuntimeError):
    """Not enough free cache blocks; callers check can_allocate / can_append first."""


class BlockManager:
    """Block ids, reference counts, a free list in eviction order, and the prefix-cache index.

    A block is in use while its ref count is > 0. Free blocks sit in `_free` (front = evicted
    first). A free block may still hold a registered hash: its KV stays valid and `allocate` can
    take it back until the block is popped for new data.
    """

    def __init__(self, num_blocks: int, block_size: int = 64, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        # hash of a full block's content once known; set only while the block holds that content
        self.hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> the one block found by lookups
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # O(1) middle removal
        # prefix-cache metrics, in prompt tokens
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # --- state -----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def all_free(self) -> bool:
        return len(self._free) == self.num_blocks and not any(self.ref)

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def slot_mapping(self, block_table: Sequence[int], start: int, end: int) -> list[int]:
        """Cache slots of token positions [start, end)."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    # --- allocation ------------------------------------------------------------------------------
    def _match(self, token_ids: Sequence[int]) -> list[int]:
        """The cached blocks to reuse for a new prompt: the longest chain of registered full blocks
        matching its prefix, less the last one when it would cover the prompt's last token.

        The last token is always recomputed so the engine gets its logits. Sharing the block that
        holds it would make the engine write that token's KV into a block other sequences read;
        recomputed KV equals the cached one only up to rounding, so instead the whole block is
        recomputed in a fresh block (as vLLM v1 does). This keeps num_cached_tokens a multiple of
        block_size and every engine write in a block held alone."""
        if not self.enable_prefix_caching:
            return []
        bs, matched, parent = self.block_size, [], None
        for i in range(len(token_ids) // bs):
            parent = block_hash(parent, token_ids[i * bs: (i + 1) * bs])
            block = self._cached.get(parent)
            if block is None:
                break
            matched.append(block)
        if matched and len(matched) * bs >= len(token_ids):
            matched.pop()
        return matched

    def _fresh_needed(self, token_ids: Sequence[int], matched: list[int]) -> tuple[int, int]:
        """(fresh blocks needed, free blocks available to them): matched blocks with ref 0 leave
        the free list too."""
        revived = sum(1 for b in matched if self.ref[b] == 0)
        return self.blocks_needed(len(token_ids)) - len(matched), len(self._free) - revived

    def can_allocate(self, token_ids: Sequence[int], reuse: bool = True) -> bool:
        need, have = self._fresh_needed(token_ids, self._match(token_ids) if reuse else [])
        return need <= have

    def allocate(self, token_ids: Sequence[int], reuse: bool = True) -> tuple[list[int], int]:
        """Blocks for a new sequence's prompt -> (block_table, num_cached_tokens). The engine must
        compute tokens [num_cached_tokens, len(token_ids)); num_cached_tokens is a multiple of
        block_size and at most len(token_ids) - 1. reuse=False takes no cached blocks (the
        sequence's full blocks are still registered for others as it computes them)."""
        if not token_ids:
            raise ValueError("cannot allocate an empty prompt: there is no token to compute")
        matched = self._match(token_ids) if reuse else []
        need, have = self._fresh_needed(token_ids, matched)
        if need > have:
            raise OutOfBlocks(f"prompt of {len(token_ids)} tokens needs {need} free blocks "
                              f"beyond {len(matched)} cached; {have} free")
        # take the matched blocks first, so popping fresh blocks cannot evict them
        for b in matched:
            if self.ref[b] == 0:
                del self._free[b]
            self.ref[b] += 1
        table = matched + [self._pop_free() for _ in range(need)]
        num_cached = len(matched) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_cache_queries += len(token_ids)
            self.prefix_cache_hits += num_cached
        return table, num_cached

    def can_append(self, block_table: Sequence[int], num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(block_table) <= len(self._free)

    def append(self, block_table: list[int], num_tokens: int) -> None:
        """Grow block_table in place to cover num_tokens tokens in total."""
        need = self.blocks_needed(num_tokens) - len(block_table)
        if need > len(self._free):
            raise OutOfBlocks(f"{num_tokens} tokens need {need} more blocks; {len(self._free)} free")
        block_table.extend(self._pop_free() for _ in range(need))

    def _pop_free(self) -> int:
        """The least recently freed block, made fresh: its old content (and hash) is about to be
        overwritten, so it leaves the prefix-cache index."""
        block, _ = self._free.popitem(last=False)
        h = self.hash[block]
        if h is not None:
            if self._cached.get(h) == block:
                del self._cached[h]
            self.hash[block] = None
        self.ref[block] = 1
        return block

    # --- prefix caching --------------------------------------------------------------------------
    def cache_full_blocks(self, block_table: Sequence[int], token_ids: Sequence[int],
                          num_computed_tokens: int) -> None:
        """Register the full blocks among tokens [0, num_computed_tokens), whose KV the engine has
        written, so later prompts can reuse them. Idempotent; call after every step."""
        if not self.enable_prefix_caching:
            return
        bs, parent = self.block_size, None
        for i in range(num_computed_tokens // bs):
            block = block_table[i]
            h = self.hash[block]
            if h is None:  # a block that already has a hash holds exactly this chain's content
                h = block_hash(parent, token_ids[i * bs: (i + 1) * bs])
                self.hash[block] = h
                # same content already registered elsewhere (e.g. a recomputed last block):
                # lookups keep finding that block; this one stays a private duplicate
                self._cached.setdefault(h, block)
            parent = h

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (after a weight update, or between benchmark runs). Refused
        (False) while blocks are in use: their KV would be registered again as they fill."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self.hash = [None] * self.num_blocks
        self.prefix_cache_queries = self.prefix_cache_hits = 0
        return True

    # --- release ---------------------------------------------------------------------------------
    def free(self, block_table: list[int]) -> None:
        """Drop one reference to each block and empty the table (so a second free is harmless).
        Blocks reaching 0 go to the back of the free list keeping their hash, tail first so a
        sequence's tail is evicted before its head, which other prompts are likelier to share."""
        if any(self.ref[b] <= 0 for b in block_table):
            raise RuntimeError(f"freeing a block that is not in use: {block_table}")
        for b in reversed(block_table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self._free[b] = None
        block_table.clear()

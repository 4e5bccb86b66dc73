"""The paged latent cache (write/gather, sizes) and the block manager (ref counts, free list,
prefix caching), with a randomized stress test against a model of what the cache must hold."""

import random

import pytest
import torch

from dsv2.config import preset
from dsv2.engine.cache import BlockManager, OutOfBlocks, PagedLatentCache, block_hash

from .conftest import tiny_config

# --- PagedLatentCache -----------------------------------------------------------------------------


def test_write_gather_round_trip():
    config = tiny_config()  # kv_lora_rank 32, qk_rope_head_dim 8, 3 layers
    r, dr, bs = config.kv_lora_rank, config.qk_rope_head_dim, 4
    pages = PagedLatentCache(config, num_blocks=10, block_size=bs, dtype=torch.float32)
    assert pages.kv.shape == (3, 10, bs, r + dr)
    g = torch.Generator().manual_seed(0)
    tables = torch.tensor([[3, 7, 1], [0, 5, -1]])  # -1 pads the shorter table
    lengths = torch.tensor([10, 6])
    data = {}
    for layer in range(3):
        for b in range(2):
            n = int(lengths[b])
            pos = torch.arange(n)
            slots = tables[b, pos // bs] * bs + pos % bs
            c, k = torch.randn(n, r, generator=g), torch.randn(n, dr, generator=g)
            pages.write(layer, slots, c, k)
            data[layer, b] = c, k
    for layer in range(3):
        c_kv, k_rope = pages.gather(layer, tables, lengths)
        assert c_kv.shape == (2, 12, r) and k_rope.shape == (2, 12, dr)
        for b in range(2):
            n = int(lengths[b])
            c, k = data[layer, b]
            assert torch.equal(c_kv[b, :n], c) and torch.equal(k_rope[b, :n], k)
            assert not c_kv[b, n:].any() and not k_rope[b, n:].any()  # past the length: zeroed
    # views: one row per token, latent then rope
    c, k = data[1, 0]
    assert torch.equal(pages.c_kv(1)[7, 2], c[6]) and torch.equal(pages.k_rope(1)[7, 2], k[6])
    assert torch.equal(pages.kv[1, 7, 2], torch.cat([c[6], k[6]]))
    assert pages.c_kv(1).data_ptr() == pages.kv[1].data_ptr()  # a view, not a copy
    pages.k_rope(2)[0].fill_(5.0)
    assert (pages.kv[2, 0, :, r:] == 5).all()


def test_write_casts_to_cache_dtype():
    config = tiny_config()
    pages = PagedLatentCache(config, num_blocks=2, block_size=4)
    assert pages.kv.dtype == torch.bfloat16
    c, k = torch.randn(3, config.kv_lora_rank), torch.randn(3, config.qk_rope_head_dim)
    pages.write(0, torch.tensor([5, 0, 2]), c, k)
    assert torch.equal(pages.c_kv(0)[1, 1], c[0].bfloat16()) and torch.equal(pages.k_rope(0)[0, 2], k[2].bfloat16())


def test_sizes_v2_lite():
    config = preset("deepseek-v2-lite")
    # 512 + 64 = 576 numbers x 2 bytes per token per layer; 27 layers x 64 tokens per block
    assert PagedLatentCache.bytes_per_block(config) == 27 * 64 * 1152 == 1_990_656
    assert PagedLatentCache.bytes_per_block(config, 16, torch.float32) == 27 * 16 * 576 * 4
    assert PagedLatentCache.num_blocks_for(config, 10 * 1_990_656 + 1_990_655) == 10
    assert PagedLatentCache.num_blocks_for(config, 1_990_655) == 0
    assert PagedLatentCache.num_blocks_for(config, 80 * 2**30, 64, torch.float32) == 80 * 2**30 // (2 * 1_990_656)
    # quantized (tests/test_kv_quant.py): fp8 644 bytes per token per layer, 6bit 466, scales included
    assert PagedLatentCache.bytes_per_block(config, 64, "fp8") == 27 * 64 * 644
    assert PagedLatentCache.num_blocks_for(config, 80 * 2**30, 64, "6bit") == 80 * 2**30 // (27 * 64 * 466)


# --- BlockManager: allocation -----------------------------------------------------------------------


def test_allocate_append_free():
    m = BlockManager(num_blocks=8, block_size=4)
    table, cached = m.allocate(list(range(10)))
    assert (table, cached) == ([0, 1, 2], 0)
    assert [m.ref[b] for b in table] == [1, 1, 1] and m.num_free_blocks == 5
    assert m.usage == pytest.approx(3 / 8)
    assert m.slot_mapping(table, 3, 6) == [3, 4, 5]
    m.append(table, 12)  # still fits in 3 blocks
    assert table == [0, 1, 2]
    m.append(table, 13)
    assert table == [0, 1, 2, 3] and m.num_free_blocks == 4
    other, _ = m.allocate(list(range(100, 116)))
    assert other == [4, 5, 6, 7] and m.num_free_blocks == 0 and m.usage == 1.0
    assert not m.can_append(table, 17) and m.can_append(table, 16)
    with pytest.raises(OutOfBlocks):
        m.append(table, 17)
    assert not m.can_allocate([1])
    with pytest.raises(OutOfBlocks):
        m.allocate([1])
    assert table == [0, 1, 2, 3] and m.num_free_blocks == 0  # failures change nothing
    m.free(table)
    assert table == [] and m.num_free_blocks == 4 and not m.all_free()
    m.free(table)  # emptied: a second free is harmless
    m.free(other)
    assert m.all_free() and m.num_free_blocks == 8 and m.usage == 0.0
    with pytest.raises(RuntimeError):
        m.free([3])  # not in use
    with pytest.raises(ValueError):
        m.allocate([])


def test_free_order_evicts_least_recently_freed_tail_first():
    m = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    a, _ = m.allocate(list(range(8)))   # [0, 1]
    b, _ = m.allocate(list(range(12)))  # [2, 3, 4]
    m.free(a)  # free list: 5, 1, 0
    m.free(b)  # free list: 5, 1, 0, 4, 3, 2
    got, _ = m.allocate(list(range(24)))
    assert got == [5, 1, 0, 4, 3, 2]


# --- BlockManager: prefix caching -------------------------------------------------------------------

BS = 4


def computed(m, tokens):
    """Allocate a prompt and mark it computed and registered, as the engine does after prefill."""
    table, cached = m.allocate(tokens)
    m.cache_full_blocks(table, tokens, len(tokens))
    return table, cached


def test_shared_prefix_reuses_full_blocks_only():
    m = BlockManager(num_blocks=16, block_size=BS)
    prefix = list(range(10, 20))  # 2.5 blocks
    a, cached = computed(m, prefix + [1, 2, 3])
    assert cached == 0
    b, cached = m.allocate(prefix + [7, 8, 9, 6, 5])
    assert cached == 2 * BS  # the half-shared third block is not reused
    assert b[:2] == a[:2] and b[2] not in a
    assert [m.ref[x] for x in a] == [2, 2, 1, 1] and [m.ref[x] for x in b[2:]] == [1, 1]
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (13 + 15, 8)
    assert m.prefix_cache_hit_rate == pytest.approx(8 / 28)
    m.free(a)
    m.free(b)
    assert m.all_free()


def test_no_reuse_before_cache_full_blocks():
    m = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(9))
    a, _ = m.allocate(tokens)
    assert m.allocate(tokens)[1] == 0  # written maybe, but not registered
    m.cache_full_blocks(a, tokens, 5)  # only the first block is computed and full
    b, cached = m.allocate(tokens)
    assert cached == BS and b[0] == a[0] and b[1] != a[1]
    m.cache_full_blocks(a, tokens, 9)
    c, cached = m.allocate(tokens)
    assert cached == 8 and c[:2] == a[:2]


def test_prompt_fully_cached_recomputes_last_token():
    """What is implemented: num_cached_tokens is a multiple of block_size and <= len - 1. When the
    cap falls inside the last matched block, that block is not shared: the prompt gets a fresh
    block and recomputes it, so the engine never writes into a block another sequence reads."""
    m = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(12))  # exactly 3 blocks
    a, _ = computed(m, tokens)
    b, cached = m.allocate(tokens)
    assert cached == 8 and b[:2] == a[:2] and b[2] != a[2] and m.ref[a[2]] == 1
    # the recomputed duplicate stays unregistered; lookups keep finding a's block
    m.cache_full_blocks(b, tokens, 12)
    c, cached = m.allocate(tokens + [99])
    assert cached == 12 == 13 - 1 and c[:3] == a[:3]  # the cap falls after the last full block
    # a prompt shorter than the cached prefix reuses what it covers
    d, cached = m.allocate(tokens[:6])
    assert cached == 4 and d[0] == a[0] and d[1] != a[1]
    e, cached = m.allocate(tokens[:4])  # one block, fully cached: recomputed
    assert cached == 0 and e[0] != a[0]
    for t in (a, b, c, d, e):
        m.free(t)
    assert m.all_free()


def test_freed_blocks_keep_hash_until_evicted():
    m = BlockManager(num_blocks=4, block_size=BS)
    tokens = list(range(12))
    a, _ = computed(m, tokens)  # [0, 1, 2]
    m.free(a)  # free list: 3, 2, 1, 0
    assert m.all_free() and m.num_cached_blocks == 3
    # reuses 2 freed blocks, takes fresh 3 then 2 (evicting a's tail)
    b_tokens = tokens[:8] + [50, 51, 52, 53, 54, 55, 56, 57]
    assert m.can_allocate(b_tokens)
    # 5 blocks: 2 revived + 3 fresh; the 2 revived ones leave only 2 free, although 3 <= 4 free now
    assert not m.can_allocate(tokens[:8] + list(range(50, 62)))
    b, cached = m.allocate(b_tokens)
    assert (b, cached) == ([0, 1, 3, 2], 8) and m.num_free_blocks == 0
    m.free(b)
    # a's third block was overwritten: only 2 blocks of a match now (and b's are registered only
    # after cache_full_blocks, which was not called)
    c, cached = m.allocate(tokens + [1])
    assert cached == 8 and c[:2] == [0, 1]
    m.free(c)


def test_eviction_order():
    m = BlockManager(num_blocks=4, block_size=BS)
    a_tokens = list(range(8))
    a, _ = computed(m, a_tokens)  # [0, 1]
    m.free(a)  # free list: 2, 3, 1, 0
    x, _ = m.allocate(list(range(100, 108)))  # never-used blocks go first
    assert x == [2, 3]
    y, _ = m.allocate(list(range(200, 204)))  # then a's tail, before its head
    assert y == [1]
    m.free(x)
    m.free(y)
    z, cached = m.allocate(a_tokens + [9])
    assert cached == 4 and z == [0, 3, 2]  # a's head survived; fresh blocks in free-list order


def test_chained_hash_needs_the_whole_prefix():
    m = BlockManager(num_blocks=16, block_size=BS)
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    computed(m, x + y + [0])
    _, cached = m.allocate(z + y + [0])  # same second block, different first block
    assert cached == 0
    assert block_hash(block_hash(None, x), y) != block_hash(block_hash(None, z), y)
    assert block_hash(None, x) != block_hash(None, [1, 2, 3, 5])


def test_hash_is_stable_across_processes():
    # computed once; sha256 over (32 zero bytes | parent digest) + int64 little-endian ids
    h1 = block_hash(None, [1, 2, 3, 4])
    assert h1.hex() == "ffb37f396c221c1e32e2d90de01d531aa5e704f43017ac4142d39b24fe4d6c58"
    assert block_hash(h1, [5, 6, 7, 8]).hex() == "1f49b0459c177f954af6a45eeb802b7e7e9d7ee9c371da27a9d5fc24a29af163"


def test_prefix_caching_disabled():
    m = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    tokens = list(range(9))
    a, _ = computed(m, tokens)
    b, cached = m.allocate(tokens)
    assert cached == 0 and not set(a) & set(b)
    assert m.num_cached_blocks == 0 and m.prefix_cache_queries == 0


def test_reset_prefix_cache():
    m = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(9))
    a, _ = computed(m, tokens)
    assert not m.reset_prefix_cache()  # refused while blocks are in use
    m.free(a)
    assert m.reset_prefix_cache() and m.num_cached_blocks == 0
    assert m.allocate(tokens)[1] == 0


# --- integration: reused blocks hold the right KV -----------------------------------------------------


def test_shared_prefix_gathers_the_right_latents():
    """Fake KV that depends on the whole prefix (as real KV does): a prompt that reuses blocks and
    writes only its uncached tokens gathers the same rows as if it had computed everything."""
    config = tiny_config()
    r, dr = config.kv_lora_rank, config.qk_rope_head_dim
    emb = torch.randn(64, r + dr, generator=torch.Generator().manual_seed(0))

    def kv_of(tokens):  # [n, r + dr], row p depends on tokens[: p + 1]
        t = torch.tensor(tokens)
        return (emb[t] * torch.arange(1, len(tokens) + 1)[:, None]).cumsum(0)

    pages = PagedLatentCache(config, num_blocks=12, block_size=BS, dtype=torch.float32)
    m = BlockManager(12, BS)

    def run(tokens):
        table, cached = m.allocate(tokens)
        kv = kv_of(tokens)[cached:]
        slots = torch.tensor(m.slot_mapping(table, cached, len(tokens)))
        for layer in range(config.num_hidden_layers):
            pages.write(layer, slots, kv[:, :r], kv[:, r:])
        m.cache_full_blocks(table, tokens, len(tokens))
        return table, cached

    a_tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    b_tokens = a_tokens[:9] + [8, 9, 7, 9, 3]
    a, _ = run(a_tokens)
    b, cached = run(b_tokens)
    assert cached == 8
    for tokens, table in ((a_tokens, a), (b_tokens, b)):
        padded = torch.tensor([table + [-1] * (5 - len(table))])
        c_kv, k_rope = pages.gather(2, padded, torch.tensor([len(tokens)]))
        want = kv_of(tokens)
        assert torch.equal(c_kv[0, : len(tokens)], want[:, :r]) and torch.equal(k_rope[0, : len(tokens)], want[:, r:])


# --- randomized stress --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_stress(prefix_caching):
    """Sequences allocate, prefill in chunks, decode, register and free in random order. A model of
    the physical cache records, per slot, the prefix whose KV was written there; every live
    sequence must read back exactly its own prefixes, writes go only to blocks held alone, and ref
    counts equal the number of live tables holding each block."""
    rng = random.Random(0)
    num_blocks, bs = 40, BS
    m = BlockManager(num_blocks, bs, enable_prefix_caching=prefix_caching)
    content: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, offset) -> prefix written there
    live: dict[int, dict] = {}
    bases = [[rng.randrange(8) for _ in range(24)] for _ in range(3)]
    next_id, allocations, refusals = 0, 0, 0

    def compute(seq, n):
        for p in range(seq["computed"], seq["computed"] + n):
            block = seq["table"][p // bs]
            assert m.ref[block] == 1, "the engine would write into a shared block"
            content[block, p % bs] = tuple(seq["tokens"][: p + 1])
        seq["computed"] += n
        m.cache_full_blocks(seq["table"], seq["tokens"], seq["computed"])

    def check():
        holders: dict[int, list[tuple[int, dict]]] = {}
        for seq in live.values():
            table = seq["table"]
            assert len(set(table)) == len(table)
            assert len(table) * bs >= len(seq["tokens"])
            for i, block in enumerate(table):
                holders.setdefault(block, []).append((i, seq))
            for p in range(seq["computed"]):
                assert content[table[p // bs], p % bs] == tuple(seq["tokens"][: p + 1])
        for block in range(num_blocks):
            assert m.ref[block] == len(holders.get(block, []))
            if len(holders.get(block, [])) > 1:  # shared: same place in every table, full, computed
                assert prefix_caching
                idx = {i for i, _ in holders[block]}
                assert len(idx) == 1 and all(s["computed"] >= (i + 1) * bs for i, s in holders[block])
        assert m.num_free_blocks == sum(1 for b in range(num_blocks) if m.ref[b] == 0)
        assert m.all_free() == (not live or all(not s["table"] for s in live.values()))

    for _ in range(3000):
        op = rng.random()
        if op < 0.3 or not live:
            base = rng.choice(bases)
            tokens = base[: rng.randrange(0, 20)] + [rng.randrange(8) for _ in range(rng.randrange(1, 8))]
            if not m.can_allocate(tokens):
                refusals += 1
                with pytest.raises(OutOfBlocks):
                    m.allocate(tokens)
            else:
                table, cached = m.allocate(tokens)
                assert cached % bs == 0 and cached <= len(tokens) - 1
                assert len(table) == -(-len(tokens) // bs)
                live[next_id] = dict(table=table, tokens=tokens, computed=cached)
                next_id += 1
                allocations += 1
        elif op < 0.8:
            seq = live[rng.choice(list(live))]
            left = len(seq["tokens"]) - seq["computed"]
            if left:  # chunked prefill
                compute(seq, rng.randrange(1, left + 1))
            elif len(seq["tokens"]) < 40:  # decode one token
                if m.can_append(seq["table"], len(seq["tokens"]) + 1):
                    seq["tokens"].append(rng.randrange(8))
                    m.append(seq["table"], len(seq["tokens"]))
                    compute(seq, 1)
                else:
                    with pytest.raises(OutOfBlocks):
                        m.append(seq["table"], len(seq["tokens"]) + 1)
        else:
            key = rng.choice(list(live))
            m.free(live.pop(key)["table"])
        check()
    for seq in live.values():
        m.free(seq["table"])
    assert m.all_free() and m.num_free_blocks == num_blocks
    assert allocations > 300 and refusals > 0
    if prefix_caching:
        assert m.prefix_cache_hits > 0

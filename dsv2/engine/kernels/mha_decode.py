"""Dense MHA decode attention straight over the paged cache: the baseline MLA is measured against.

For each sequence b and head h, over the sequence's tokens t, with g = h // (n_h / n_kv) its
key/value head (g = h for plain MHA; GQA shares one among a group of heads, MQA one among all):
    score_t = (q[b,h] . k_t[g]) * scale
    o[b,h] = sum_t softmax(score)_t v_t[g]
A cache row holds k of every key/value head then v of every one (2 n_kv d_h numbers,
PagedLatentCache's MHA layout), so each head reads its own d_h-wide slices of every row (a GQA
group's heads the same ones, mostly from L2 after the first): unlike MLA, whose heads all read one
latent, which is why MHA decoding moves 2 n_kv d_h / (d_c + d_h^R) times more bytes per token.
One query per head, so the scores are elementwise products and sums, not matrix products. Long
contexts are split across programs (flash-decoding); mla_decode's merge kernel combines the splits.
"""

from __future__ import annotations

import torch

from ...model.kernels import pdl
from .mla_decode import sequence_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None


def kv_heads(q: torch.Tensor, kv: torch.Tensor) -> int:
    """The key/value heads a cache row of `kv` holds for queries `q` [B, H, D]: its width / 2D,
    checked to divide H."""
    h, d = q.shape[1:]
    n, rem = divmod(kv.shape[-1], 2 * d)
    if rem or n < 1 or h % n:
        raise ValueError(f"kv rows of width {kv.shape[-1]} are not k then v of key/value heads of {d} "
                         f"dividing the {h} query heads")
    return n


def mha_decode_reference(q, kv, block_tables, context_lens, scale):
    """Plain PyTorch, fp32: q [B, H, D] (rotated), kv [num_blocks, block_size, 2 Hkv D] with Hkv
    dividing H, block_tables [B, max_blocks], context_lens [B] -> o [B, H, D]."""
    b, h, d = q.shape
    group = h // kv_heads(q, kv)
    out = torch.empty(b, h, d, dtype=torch.float32, device=q.device)
    for i in range(b):
        rows = sequence_rows(kv, block_tables[i], int(context_lens[i]))  # [n, 2 Hkv D]
        k, v = rows.unflatten(-1, (2, h // group, d)).unbind(1)  # [n, Hkv, D] each
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # head h reads h // group
        scores = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


if triton is not None:
    from .mla_decode import _merge_kernel, _sm_count

    @triton.jit
    def _split_kernel(
        q_ptr, kv_ptr, tables_ptr, lens_ptr, part_o_ptr, part_ml_ptr,
        scale, stride_table, stride_page, stride_token, max_blocks_per_split, n_heads, group, n_kv_heads,
        D: tl.constexpr, BLOCK_SIZE: tl.constexpr, N_SPLITS: tl.constexpr, USE_GDC: tl.constexpr,
    ):
        pdl.grid_wait(USE_GDC)
        b = tl.program_id(0)
        h = tl.program_id(1)
        g = h // group  # the key/value head this query head reads
        split = tl.program_id(2)
        offs_d = tl.arange(0, D)
        offs_t = tl.arange(0, BLOCK_SIZE)
        q = tl.load(q_ptr + (b * n_heads + h) * D + offs_d).to(tl.float32)
        length = tl.load(lens_ptr + b)
        first = split * max_blocks_per_split
        last = tl.minimum(first + max_blocks_per_split, tl.cdiv(length, BLOCK_SIZE))
        m_i = float("-inf")
        l_i = 0.0
        acc = tl.zeros([D], tl.float32)
        for blk in range(first, last):
            page = tl.load(tables_ptr + b * stride_table + blk).to(tl.int64)
            tok = blk * BLOCK_SIZE + offs_t
            tmask = tok < length
            row = kv_ptr + page * stride_page + offs_t[:, None] * stride_token
            k = tl.load(row + g * D + offs_d[None, :], mask=tmask[:, None], other=0.0)  # [T, D]
            v = tl.load(row + (n_kv_heads + g) * D + offs_d[None, :], mask=tmask[:, None], other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale  # [T]
            s = tl.where(tmask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            m_i = m_new
        # the layout _merge_kernel reads: [B, H, N_SPLITS, D] partial outputs, [.., 2] (max, sum);
        # an empty split leaves max -inf, which the merge weighs 0
        base = (b * n_heads + h) * N_SPLITS + split
        tl.store(part_o_ptr + base * D + offs_d, acc)
        tl.store(part_ml_ptr + base * 2, m_i)
        tl.store(part_ml_ptr + base * 2 + 1, l_i)


def mha_decode(q, kv, block_tables, context_lens, scale, num_splits=None):
    """Triton on CUDA, the reference elsewhere. Same arguments as `mha_decode_reference`; returns
    o [B, H, D] in fp32. The split count follows the shapes only (never context_lens' values), so
    a step is capturable in a CUDA graph. D and block_size must be powers of two."""
    if triton is None or not q.is_cuda:
        return mha_decode_reference(q, kv, block_tables, context_lens, scale)
    b, h, d = q.shape
    block_size = kv.shape[1]
    max_blocks = block_tables.shape[1]
    n_kv = kv_heads(q, kv)
    if kv.stride(-1) != 1:
        raise ValueError(f"kv rows must be contiguous; got shape {tuple(kv.shape)}, strides {kv.stride()}")
    if d & (d - 1) or block_size & (block_size - 1):
        raise ValueError(f"head dim ({d}) and block size ({block_size}) must be powers of two")
    if num_splits is None:  # enough programs to fill the GPU when batch x heads is small
        sms = _sm_count(q.device.index or 0)
        num_splits = max(1, min(triton.next_power_of_2(max(1, 2 * sms // max(1, b * h))), 64,
                                triton.next_power_of_2(max_blocks)))
    per_split = triton.cdiv(max_blocks, num_splits)
    part_o = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(b, h, num_splits, 2, dtype=torch.float32, device=q.device)
    _split_kernel[(b, h, num_splits)](
        q.contiguous(), kv, block_tables, context_lens, part_o, part_ml,
        scale, block_tables.stride(0), kv.stride(0), kv.stride(1), per_split, h, h // n_kv, n_kv,
        D=d, BLOCK_SIZE=block_size, N_SPLITS=num_splits, num_warps=4, num_stages=2, **pdl.options(kv))
    out = torch.empty(b, h, d, dtype=torch.float32, device=q.device)
    _merge_kernel[(b * h,)](part_o, part_ml, out, R=d, N_SPLITS=num_splits, **pdl.options(out))
    return out

"""MLA decode attention straight over the paged latent cache (absorbed form).

For each sequence b and head h, with the query already folded with W^UK:
    score_t = (q_latent[b,h] . c_kv_t + q_rope[b,h] . k_rope_t) * scale     over the sequence's tokens t
    o_latent[b,h] = sum_t softmax(score)_t c_kv_t                            (values are the latent itself)
Keys are 576 wide (512 latent + 64 rope), values 512; all heads read the same cached rows, so one
page load serves every head of the sequence. Long contexts are split across programs
(flash-decoding): each split keeps a running max, sum and accumulator, and a second small kernel
merges the splits. For one sequence (batch-1 decode) the merge can also apply W^UV: each program
merges one head's splits and multiplies them by a slice of that head's W^UV, so the per-head value
projection costs no launch of its own.
"""

from __future__ import annotations

import functools

import torch

from ...model.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None


def sequence_rows(kv: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """The first n cached rows of one sequence, [n, width] fp32, from its pages (kv [blocks, block_size, width])."""
    block_size = kv.shape[1]
    pages = block_table[: (n + block_size - 1) // block_size].long()
    return kv[pages].reshape(-1, kv.shape[-1])[:n].float()


def mla_decode_reference(q_latent, q_rope, kv, block_tables, context_lens, scale, kv_lora_rank, w_uv=None):
    """Plain PyTorch, fp32: q_latent [B, H, r], q_rope [B, H, dr], kv [num_blocks, block_size, r + dr],
    block_tables [B, max_blocks], context_lens [B] -> o_latent [B, H, r]; with w_uv [H, v, r], the
    heads' values o_latent W^UV^T [B, H, v] in w_uv's dtype."""
    b, h, r = q_latent.shape
    out = torch.empty(b, h, r, dtype=torch.float32, device=q_latent.device)
    for i in range(b):
        rows = sequence_rows(kv, block_tables[i], int(context_lens[i]))  # [n, r + dr]
        scores = (q_latent[i].float() @ rows[:, :r].T + q_rope[i].float() @ rows[:, r:].T) * scale
        out[i] = scores.softmax(-1) @ rows[:, :r]
    if w_uv is not None:
        return torch.einsum("bhr,hvr->bhv", out, w_uv.float()).to(w_uv.dtype)
    return out


if triton is not None:

    @triton.jit
    def _split_kernel(
        q_lat_ptr, q_rope_ptr, kv_ptr, tables_ptr, lens_ptr, part_o_ptr, part_ml_ptr,
        scale, stride_table, max_blocks_per_split, n_heads,
        R: tl.constexpr, DR: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
        N_SPLITS: tl.constexpr, PRECISION: tl.constexpr, USE_GDC: tl.constexpr,
    ):
        pdl.grid_wait(USE_GDC)
        b = tl.program_id(0)
        hb = tl.program_id(1)
        split = tl.program_id(2)
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < n_heads
        offs_r = tl.arange(0, R)
        offs_dr = tl.arange(0, DR)
        offs_t = tl.arange(0, BLOCK_SIZE)
        q_lat = tl.load(q_lat_ptr + (b * n_heads + heads)[:, None] * R + offs_r[None, :],
                        mask=hmask[:, None], other=0.0)
        q_rope = tl.load(q_rope_ptr + (b * n_heads + heads)[:, None] * DR + offs_dr[None, :],
                         mask=hmask[:, None], other=0.0)
        length = tl.load(lens_ptr + b)
        first = split * max_blocks_per_split
        last = tl.minimum(first + max_blocks_per_split, tl.cdiv(length, BLOCK_SIZE))
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, R], tl.float32)
        for blk in range(first, last):
            page = tl.load(tables_ptr + b * stride_table + blk).to(tl.int64)
            tok = blk * BLOCK_SIZE + offs_t
            tmask = tok < length
            row = kv_ptr + (page * BLOCK_SIZE + offs_t)[:, None] * (R + DR)
            c = tl.load(row + offs_r[None, :], mask=tmask[:, None], other=0.0)  # [T, R]
            kr = tl.load(row + R + offs_dr[None, :], mask=tmask[:, None], other=0.0)  # [T, DR]
            s = (tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
                 + tl.dot(q_rope, tl.trans(kr), input_precision=PRECISION))
            s = s * scale
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
            m_i = m_new
        base = (b * n_heads + heads) * N_SPLITS + split
        tl.store(part_o_ptr + base[:, None] * R + offs_r[None, :], acc, mask=hmask[:, None])
        tl.store(part_ml_ptr + base * 2, m_i, mask=hmask)
        tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=hmask)

    @triton.jit
    def _merge_kernel(part_o_ptr, part_ml_ptr, out_ptr, R: tl.constexpr, N_SPLITS: tl.constexpr,
                      USE_GDC: tl.constexpr):
        pdl.grid_wait(USE_GDC)
        bh = tl.program_id(0)
        offs_r = tl.arange(0, R)
        splits = tl.arange(0, N_SPLITS)
        m = tl.load(part_ml_ptr + (bh * N_SPLITS + splits) * 2)
        l = tl.load(part_ml_ptr + (bh * N_SPLITS + splits) * 2 + 1)
        m_max = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)  # empty splits weigh nothing
        o = tl.load(part_o_ptr + (bh * N_SPLITS + splits)[:, None] * R + offs_r[None, :])
        total = tl.sum(w * l, 0)
        res = tl.sum(o * w[:, None], 0) / total
        tl.store(out_ptr + bh * R + offs_r, res)


    @triton.jit
    def _merge_uv_kernel(part_o_ptr, part_ml_ptr, w_ptr, out_ptr, n_heads, V, stride_wh, stride_wv,
                         R: tl.constexpr, N_SPLITS: tl.constexpr, BLOCK_V: tl.constexpr, USE_GDC: tl.constexpr):
        # program (b * H + h, tile): head h's splits merged (as _merge_kernel), times BLOCK_V rows of
        # its W^UV [v, r]. The weight slice is requested before the wait (it does not depend on the
        # split kernel); every tile of a head merges again, from L2 (32 KB for 16 splits)
        bh = tl.program_id(0)
        h = bh % n_heads
        offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        offs_r = tl.arange(0, R)
        splits = tl.arange(0, N_SPLITS)
        w = tl.load(w_ptr + h * stride_wh + offs_v[:, None] * stride_wv + offs_r[None, :], mask=v_mask[:, None],
                    other=0.0)
        pdl.grid_wait(USE_GDC)
        m = tl.load(part_ml_ptr + (bh * N_SPLITS + splits) * 2)
        l = tl.load(part_ml_ptr + (bh * N_SPLITS + splits) * 2 + 1)
        o = tl.load(part_o_ptr + (bh * N_SPLITS + splits)[:, None] * R + offs_r[None, :])
        m_max = tl.max(m, 0)
        wt = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
        o = tl.sum(o * wt[:, None], 0) / tl.sum(wt * l, 0)  # [R]: the merged o_latent
        acc = tl.sum(w.to(tl.float32) * o[None, :], 1)
        tl.store(out_ptr + bh * V + offs_v, acc.to(out_ptr.dtype.element_ty), mask=v_mask)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def mla_decode(q_latent, q_rope, kv, block_tables, context_lens, scale, kv_lora_rank, num_splits=None, w_uv=None):
    """Triton on CUDA, the reference elsewhere. Same arguments as `mla_decode_reference`; returns
    o_latent [B, H, r] in fp32, or with w_uv (one sequence only: its heads' W^UV) [1, H, v]."""
    if triton is None or not q_latent.is_cuda:
        return mla_decode_reference(q_latent, q_rope, kv, block_tables, context_lens, scale, kv_lora_rank, w_uv)
    b, h, r = q_latent.shape
    dr = q_rope.shape[-1]
    block_size = kv.shape[1]
    max_blocks = block_tables.shape[1]
    if num_splits is None:  # enough programs to fill the GPU when the batch is small
        sms = _sm_count(q_latent.device.index or 0)
        num_splits = max(1, min(triton.next_power_of_2(max(1, 2 * sms // max(1, b))), 64,
                                triton.next_power_of_2(max_blocks)))
    per_split = triton.cdiv(max_blocks, num_splits)
    block_h = 16
    part_o = torch.empty(b, h, num_splits, r, dtype=torch.float32, device=q_latent.device)
    part_ml = torch.empty(b, h, num_splits, 2, dtype=torch.float32, device=q_latent.device)
    grid = (b, triton.cdiv(h, block_h), num_splits)
    _split_kernel[grid](
        q_latent.contiguous(), q_rope.contiguous(), kv, block_tables, context_lens, part_o, part_ml,
        scale, block_tables.stride(0), per_split, h,
        R=r, DR=dr, BLOCK_SIZE=block_size, BLOCK_H=block_h, N_SPLITS=num_splits,
        # fp32 caches get fp32 dots (not tf32): the fp32 path is the one tests hold to tight bounds
        PRECISION="ieee" if kv.dtype == torch.float32 else None, num_warps=8, num_stages=2,
        **pdl.options(kv))
    if w_uv is not None:
        assert b == 1 and w_uv.shape[0] == h and w_uv.shape[2] == r and w_uv.stride(2) == 1, "w_uv [H, v, r], one row"
        v = w_uv.shape[1]
        out = torch.empty(b, h, v, dtype=w_uv.dtype, device=q_latent.device)
        block_v = 16  # 128 programs for V2's 16 heads of 128
        _merge_uv_kernel[(b * h, triton.cdiv(v, block_v))](
            part_o, part_ml, w_uv, out, h, v, w_uv.stride(0), w_uv.stride(1),
            R=r, N_SPLITS=num_splits, BLOCK_V=block_v, num_warps=8, **pdl.options(out))
        return out
    out = torch.empty(b, h, r, dtype=torch.float32, device=q_latent.device)
    _merge_kernel[(b * h,)](part_o, part_ml, out, R=r, N_SPLITS=num_splits, **pdl.options(out))
    return out

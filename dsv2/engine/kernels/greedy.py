"""Greedy sampling over the logits: each row's argmax and its log-probability.

The chosen token's logprob is max - logsumexp. In PyTorch that is three reductions over the
vocabulary (the logsumexp's max and sum, the argmax) with a row or a few: each runs on a handful of
SMs, 15 us apiece at 102,400 logits on an H100, plus the casts and the gather after them. Here
programs of 4,096 logits each keep a running max, first argmax and rescaled sum (one program per
row took 27 us: too few SMs again), and a second launch combines a row's chunks and writes the
results where the engine wants them: the token ids on the device (the next step's inputs) and
[token, logprob] as float64 for the copy back to the host.
"""

from __future__ import annotations

import torch

from ...model.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the reference
    triton = None


def greedy_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> token ids [B] int64 (the first maximum), logprobs [B] fp32 of those tokens."""
    logits = logits.float()
    return logits.argmax(dim=-1), logits.amax(dim=-1) - logits.logsumexp(dim=-1)


if triton is not None:

    @triton.jit
    def _chunk_kernel(logits_ptr, part_ptr, V, stride, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                      USE_GDC: tl.constexpr):
        pdl.grid_wait(USE_GDC)
        # one chunk of one row: its max, first argmax and sum of exp(x - max)
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        idx = tl.zeros([BLOCK], tl.int32)
        for v0 in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
            x = tl.load(logits_ptr + row.to(tl.int64) * stride + v0 + offs, mask=offs < V - v0,
                        other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            # each lane keeps its first maximum (strictly greater replaces); -inf lanes add nothing
            s = tl.where(m_new == float("-inf"), 0.0, s * tl.exp(m - m_new) + tl.exp(x - m_new))
            idx = tl.where(x > m, v0 + offs, idx)
            m = m_new
        best, total, token = _merge(m, s, idx, V)
        ptr = part_ptr + (row * tl.num_programs(1) + chunk) * 3
        tl.store(ptr, best)
        tl.store(ptr + 1, total)
        tl.store(ptr + 2, token.to(tl.float32))

    @triton.jit
    def _merge(m, s, idx, V):
        """Lanes' (max, sum of exp(x - max), first argmax) -> one; lanes in index order, so the
        smallest index among the maxima is the first maximum."""
        best = tl.max(m, axis=0)
        total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - best)), axis=0)
        return best, total, tl.min(tl.where(m == best, idx, V), axis=0)

    @triton.jit
    def _combine_kernel(part_ptr, tokens_ptr, host_ptr, B, V, CHUNKS, BLOCK_C: tl.constexpr,
                        USE_GDC: tl.constexpr):
        pdl.grid_wait(USE_GDC)
        row = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)
        ptr = part_ptr + (row * CHUNKS + c) * 3
        m = tl.load(ptr, mask=c < CHUNKS, other=float("-inf"))
        s = tl.load(ptr + 1, mask=c < CHUNKS, other=0.0)
        idx = tl.load(ptr + 2, mask=c < CHUNKS, other=0.0).to(tl.int32)
        _, total, token = _merge(m, s, idx, V)
        tl.store(tokens_ptr + row, token.to(tl.int64))
        tl.store(host_ptr + row, token.to(tl.float64))
        tl.store(host_ptr + B + row, (-tl.log(total)).to(tl.float64))


CHUNK = 4096  # logits per program: 25 programs a row at V = 102,400


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] on CUDA -> (token ids [B] int64, [2, B] float64: token ids and their logprobs)."""
    b, v = logits.shape
    assert logits.stride(-1) == 1
    tokens = torch.empty(b, dtype=torch.long, device=logits.device)
    host = torch.empty(2, b, dtype=torch.float64, device=logits.device)
    if b:
        chunks = triton.cdiv(v, CHUNK)
        # (max, sum, argmax) per chunk; token ids up to 2^24 are exact in fp32
        parts = torch.empty(b, chunks, 3, dtype=torch.float32, device=logits.device)
        _chunk_kernel[(b, chunks)](logits, parts, v, logits.stride(0), CHUNK=CHUNK, BLOCK=1024, num_warps=4,
                                           **pdl.options(logits))
        _combine_kernel[(b,)](parts, tokens, host, b, v, chunks, BLOCK_C=triton.next_power_of_2(chunks),
                               num_warps=1, **pdl.options(logits))
    return tokens, host

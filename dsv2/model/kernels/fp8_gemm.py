"""Block-scaled FP8 GEMMs: the scheme DeepSeek-V3 describes, for prefill and large decode batches.

Weights are e4m3 with one float32 scale per 128 x 128 block (model/fp8.py). Activations are
quantized as they arrive, one scale per token and 128-wide group of its features (1 x 128), so an
outlier spoils only its own group. The GEMM then runs on FP8 tensor cores, one 128-deep K block at
a time, and each block's fp32 partial product is scaled by its row's activation scale times its
column's weight scale before it joins the fp32 accumulator:
    out[m, n] = sum_kb  a_scale[m, kb] * w_scale[n // 128, kb] * sum_{k in kb} a[m, k] * w[n, k]
The same kernel serves a dense linear (one group) and the routed experts' grouped GEMM (rows sorted
by expert, `offsets` where each expert's rows start): program t of the first grid axis finds its row
tile by counting each expert's tiles on the device, so no count is read back to the host and a step
that calls it stays capturable in a CUDA graph.

Few-row decode batches take the FP8-reading twins of the bf16 decode kernels instead
(kernels/small_linear.py, kernels/moe_gemm.py): there the weight bytes are the cost. They quantize
their activations the same way, in the kernel (`quant_groups`), so a token's logits do not depend on
whether a prefill or a decode step computed them. Where no FP8 tensor core is (CPU, GPUs before
compute capability 8.9), `fp8_linear` and `fp8_grouped_mm` dequantize the weight and run the matmul
in the activations' dtype (weight-only: the activations are not rounded).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .. import fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs dequantize
    triton = None

GROUP = fp8.BLOCK  # activation scales: one per 128 features of a row


@functools.cache
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_supported(device: torch.device | str) -> bool:
    """Whether FP8 tensor cores (and Triton's e4m3 conversions) exist there: CUDA, compute capability 8.9+."""
    device = torch.device(device)
    return triton is not None and device.type == "cuda" and _capability_ok(device.index or 0)


def warn_if_unsupported(device: torch.device | str) -> None:
    """FP8 weights on a GPU without FP8 tensor cores run, but as weight-only dequantization."""
    device = torch.device(device)
    if device.type == "cuda" and not fp8_supported(device):
        warnings.warn(f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (compute capability 8.9+): "
                      "FP8 weights are dequantized for each matmul (weight-only), which saves memory but not time",
                      stacklevel=3)


def act_quant_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, ceil(K/128)]): each row's 128-wide groups scaled
    so that their largest |x| lands on 448 (an all-zero group gets scale 1)."""
    m, k = x.shape
    groups = -(-k // GROUP)
    padded = F.pad(x.float(), (0, groups * GROUP - k)).view(m, groups, GROUP)
    amax = padded.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / fp8.FP8_MAX, torch.ones_like(amax))
    q = (padded / scale[..., None]).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8)
    return q.view(m, -1)[:, :k].contiguous(), scale


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, counts: torch.Tensor,
                         split: int | None = None) -> torch.Tensor:
    """x [M, K] sorted by expert, counts [E], FP8 w [E, N, K] -> [M, N] in x.dtype, weight-only:
    each expert's weight dequantized (its rows past `split` with their own block rows, as gate_up)."""
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start:start + n] = x[start:start + n] @ fp8.dequantize_rows(w[e], w_scale[e], split, x.dtype).t()
            start += n
    return out


if triton is not None:

    @triton.jit
    def quant_groups(x):
        """x [R, 128] float32, a 128-wide group per row -> (e4m3 [R, 128], float32 scales [R]): each
        group scaled so that its largest |x| lands on 448 (scale 1 for an all-zero group). Every FP8
        kernel quantizes its activations here, so prefill and decode round them alike."""
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.where(amax > 0, amax / 448.0, 1.0)
        return tl.clamp(x / scale[:, None], -448.0, 448.0).to(tl.float8e4nv), scale

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, stride_sg,
                          GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr):
        # one program per row: its groups as a [GROUPS, 128] tile
        m = tl.program_id(0).to(tl.int64)
        offs_g = tl.arange(0, GROUPS)
        offs_k = offs_g[:, None] * GROUP_SIZE + tl.arange(0, GROUP_SIZE)[None, :]
        mask = offs_k < K
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=mask, other=0.0).to(tl.float32)
        q, scale = quant_groups(x)
        tl.store(q_ptr + m * stride_qm + offs_k, q, mask=mask)
        tl.store(s_ptr + m * stride_sm + offs_g * stride_sg, scale, mask=offs_g * GROUP_SIZE < K)

    @triton.jit
    def _find_tile(offsets_ptr, t, n_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
        """Row tile t of a grouped GEMM -> (expert, first row, the expert's end row); end -1 past the
        last tile. Expert e's rows offsets[e]:offsets[e + 1] make ceil(rows / BLOCK_M) tiles, in expert order."""
        offs_e = tl.arange(0, BLOCK_E)
        e_mask = offs_e < n_experts
        lo = tl.load(offsets_ptr + offs_e, mask=e_mask, other=0)
        hi = tl.load(offsets_ptr + offs_e + 1, mask=e_mask, other=0)
        tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        last = tl.cumsum(tiles, 0)  # expert e's tiles are last[e] - tiles[e] .. last[e] - 1
        pick = (t < last) & (t >= last - tiles)
        found = tl.sum(pick.to(tl.int32), 0)
        e = tl.sum(tl.where(pick, offs_e, 0), 0)
        start = tl.sum(tl.where(pick, lo + (t - (last - tiles)) * BLOCK_M, 0), 0)
        end = tl.where(found > 0, tl.sum(tl.where(pick, hi, 0), 0), -1)
        return e, start, end

    @triton.jit
    def _fp8_gemm_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offsets_ptr,
        M, N, K, n_experts, split, split_blocks,
        stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        DENSE: tl.constexpr,
    ):
        # a [M, K] e4m3 with as [M, K/128]; b [E, N, K] e4m3 with bs [E, N/128, K/128]; expert e owns
        # a's rows offsets[e]:offsets[e + 1]. Rows of b past `split` take their block rows from
        # split_blocks on (gate_up_proj: the up half's blocks follow the gate half's). DENSE: one
        # expert owning all M rows, no offsets.
        t = tl.program_id(0)
        pid_n = tl.program_id(1)
        if DENSE:
            e = t * 0
            start = t * BLOCK_M
            end = M
        else:
            e, start, end = _find_tile(offsets_ptr, t, n_experts, BLOCK_M, BLOCK_E)
            if end < 0:
                return  # the grid is sized for the worst case of tiles
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        n_block = tl.where(offs_n < split, offs_n // BLOCK_K, split_blocks + (offs_n - split) // BLOCK_K)
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + e.to(tl.int64) * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
        as_ptrs = as_ptr + rows.to(tl.int64) * stride_asm
        bs_ptrs = bs_ptr + e.to(tl.int64) * stride_bse + n_block * stride_bsn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k_mask = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs + kb * BLOCK_K, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs + kb * BLOCK_K, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            a_s = tl.load(as_ptrs + kb, mask=row_mask, other=0.0)
            b_s = tl.load(bs_ptrs + kb, mask=n_mask, other=0.0)
            acc += tl.dot(a, b) * (a_s[:, None] * b_s[None, :])
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def act_quant(x: torch.Tensor, column_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 [M, ceil(K/128)]) per-token-group scales; one launch on CUDA.
    column_major: the scales stored with M contiguous (the layout cuBLAS's block-scaled GEMM reads)."""
    if triton is None or not x.is_cuda:
        q, s = act_quant_reference(x)
        return q, (s.t().contiguous().t() if column_major else s)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    groups = -(-k // GROUP)
    q = torch.empty(m, k, dtype=fp8.FP8, device=x.device)
    s = torch.empty(groups, m, dtype=torch.float32, device=x.device).t() if column_major else \
        torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        block_g = triton.next_power_of_2(groups)
        _act_quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), s.stride(0), s.stride(1), GROUPS=block_g,
                                GROUP_SIZE=GROUP, num_warps=4 if block_g <= 16 else 8)
    return q, s


@functools.cache
def _cublas_block_scaled(device: torch.device, n: int, k: int) -> bool:
    """Whether torch._scaled_mm takes 1 x 128 activation and 128 x 128 weight scales for an [N, K]
    weight here (CUDA 12.9+ builds on Hopper, N and K aligned as cuBLAS needs; some versions want
    the weight scales' rows padded, which ours are not): tried once per shape, on 5 rows of zeros."""
    if not (hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) == (9, 0)):
        return False
    groups = -(-k // GROUP)
    try:
        a = torch.zeros(5, k, dtype=fp8.FP8, device=device)
        w = torch.zeros(n, k, dtype=fp8.FP8, device=device)
        a_s = torch.ones(groups, 5, device=device).t()
        w_s = torch.ones(-(-n // GROUP), groups, device=device)
        torch._scaled_mm(a, w.t(), a_s, w_s.t(), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _launch_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor | None,
                 split: int | None, out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] (bf16/fp32, sorted by expert), w [E, N, K] e4m3, w_scale [E, ceil(N/128), ceil(K/128)],
    offsets [E + 1] int32 (None: E = 1, every row) -> [M, N] in out_dtype."""
    m, k = x.shape
    n_experts, n, _ = w.shape
    assert w.shape[2] == k and w.stride(2) == 1, "w [E, N, K] with K contiguous"
    assert w_scale.shape == (n_experts, *fp8.scale_shape(w.shape[1:])) or split is not None, "w_scale's shape"
    dense = offsets is None
    # (whole blocks only: cuBLAS's handling of a partial block at the K or N edge is not the format's)
    if (dense and m and out_dtype == torch.bfloat16 and n % fp8.BLOCK == 0 and k % fp8.BLOCK == 0
            and _cublas_block_scaled(x.device, n, k)):
        # cuBLAS's 1 x 128 by 128 x 128 block-scaled FP8 GEMM: 1.4x the Triton kernel below on V2-Lite's
        # dense prefill shapes (H200, bench/fp8_engine_bench.py --sections tune)
        a, a_scale = act_quant(x, column_major=True)
        return torch._scaled_mm(a, w[0].t(), a_scale, w_scale[0].t(), out_dtype=out_dtype)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    a, a_scale = act_quant(x)
    w_scale = w_scale.contiguous()
    # 64 x 128 tiles, one warpgroup, 3 stages: the fastest of seven tile shapes on every V2-Lite
    # prefill shape (bench/fp8_engine_bench.py --sections tune, H200)
    block_m, block_n = 64, 128
    tiles = triton.cdiv(m, block_m) + (0 if dense else n_experts - 1)
    split_rows = n if split is None else split
    _fp8_gemm_kernel[(tiles, triton.cdiv(n, block_n))](
        a, a_scale, w, w_scale, out, out if dense else offsets,
        m, n, k, n_experts, split_rows, -(-split_rows // fp8.BLOCK),
        a.stride(0), a_scale.stride(0), w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=fp8.BLOCK, BLOCK_E=triton.next_power_of_2(n_experts),
        DENSE=dense, num_warps=4, num_stages=3)
    return out


if triton is not None:
    # opaque to torch.compile, as the other kernels: shapes pick the tiles
    @torch.library.custom_op("dsv2::fp8_gemm", mutates_args=())
    def _fp8_gemm_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor | None,
                     split: int) -> torch.Tensor:
        return _launch_gemm(x, w, w_scale, offsets, split if split > 0 else None, x.dtype)

    @_fp8_gemm_op.register_fake
    def _(x, w, w_scale, offsets, split):
        return x.new_empty(x.shape[0], w.shape[1])


def _gemm(x, w, w_scale, offsets, split):
    if torch.compiler.is_compiling():
        return _fp8_gemm_op(x, w, w_scale, offsets, split or 0)
    return _launch_gemm(x, w, w_scale, offsets, split, x.dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) for an FP8 block-scaled W [N, K], in x's dtype: FP8 x FP8 on tensor
    cores with 1 x 128 activation scales where FP8 is supported, else W dequantized first."""
    if not fp8_supported(x.device) or (torch.is_grad_enabled() and x.requires_grad):
        return F.linear(x, fp8.dequantize(weight, weight_scale_inv, x.dtype), bias)
    rows = x.reshape(-1, x.shape[-1])
    y = _gemm(rows, weight[None], weight_scale_inv[None], None, None)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, counts: torch.Tensor,
                   split: int | None = None) -> torch.Tensor:
    """x [M, K] sorted by expert, counts [E] rows per expert, FP8 w [E, N, K] with block scales
    [E, ., ceil(K/128)] -> [M, N] in x.dtype. `split`: w's rows from there on are a second matrix
    with its own block rows (gate_up_proj's up half, when the intermediate size is not a multiple of 128)."""
    if not fp8_supported(x.device) or (torch.is_grad_enabled() and x.requires_grad):
        return grouped_mm_reference(x, w, w_scale, counts, split)
    offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return _gemm(x, w, w_scale, offsets, split)

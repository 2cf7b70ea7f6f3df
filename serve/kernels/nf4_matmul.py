"""Matmul against a 4-bit (NF4 or FP4) weight, dequantized tile by tile in registers.

    y = x @ Wᵀ + bias,    W[n, k] = code[q[n·K + k]] · absmax[(n·K + k) // 64]

with q the 4-bit indices bitsandbytes' `quantize_4bit` packs two to a byte (high nibble first)
and absmax its scale per 64 weights (double quantization undone once, at load, into fp32).
Each tile of W is rounded to the activations' dtype as `dequantize_4bit` rounds it, so the
product is bitsandbytes' dequantize-then-matmul up to summation order; but W crosses memory
once, at 4 bits, where bitsandbytes at batch > 1 reads 4 bits, writes 16 and reads 16 again
(bench/gpu_notes.md, v2).

A program takes BLOCK_M rows of x and BLOCK_N output features; the even and odd columns of x
meet the high and low nibbles of each byte in two dots, so no tile is interleaved. SPLIT_K
programs share one tile's reduction over K (atomic adds into fp32) when there are too few
tiles to fill the GPU: a decode step has one row tile.

Past a few hundred rows (prefill chunks) the matmul is bound by compute, and building W
again for every row tile costs more than writing it out once: `nf4_dequantize` does that,
for a dense matmul after (what bitsandbytes does at every batch size).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from serve.kernels import dot_precision, power_of_2_at_most

# The kernels read one absmax per 64 weights (serve.linear.BLOCKSIZE, the trainer's setting)
# as a literal: a constant folded into the index arithmetic.


# M, the step's token count, changes from step to step: specializing on it (== 1, divisible
# by 16) would triple the compiles for nothing the masks do not already handle.
@triton.jit(do_not_specialize=["M"])
def _nf4_matmul_kernel(
    x_ptr,  # [M, K], last dim contiguous
    packed_ptr,  # [N * K / 2] uint8
    absmax_ptr,  # [N * K / 64] fp32
    code_ptr,  # [16] fp32
    bias_ptr,  # [N] or a dummy
    out_ptr,  # [M, N]: x's dtype, or fp32 zeros when SPLIT_K > 1
    M,
    N,
    K,
    stride_xm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm
    row_start = n.to(tl.int64)[:, None] * K  # flat index of each output feature's first weight
    half = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(tl.program_id(2) * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + 2 * half  # the tile's even columns; K is even, so k + 1 < K wherever k < K
        k_ok = k < K
        flat = row_start + k[None, :]  # [BLOCK_N, BLOCK_K / 2]
        w_ok = n_ok[:, None] & k_ok[None, :]
        byte = tl.load(packed_ptr + flat // 2, mask=w_ok, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + flat // 64, mask=w_ok, other=0.0)
        w_even = (tl.load(code_ptr + (byte >> 4)) * scale).to(x_ptr.dtype.element_ty)
        w_odd = (tl.load(code_ptr + (byte & 15)) * scale).to(x_ptr.dtype.element_ty)
        x_ok = m_ok[:, None] & k_ok[None, :]
        x_even = tl.load(x_rows + k[None, :], mask=x_ok, other=0.0)
        x_odd = tl.load(x_rows + k[None, :] + 1, mask=x_ok, other=0.0)
        acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision=PRECISION)
        acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision=PRECISION)
    out = out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 64,
    split_k: int | None = None,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """x @ Wᵀ + bias in x's dtype, W the [out_features, K] 4-bit weight described above.

    x: [M, K], K even; packed: uint8 holding out_features·K/2 bytes; absmax: fp32
    [ceil(out_features·K / 64)]; code: fp32 [16], the quantization's value of each index;
    bias: [out_features] or None. The keywords are tuning knobs (None: chosen from the shape;
    bench/gpu_throughput.py's `tune` section sweeps them). The defaults compile for sm_90
    without spills (80-127 registers); BLOCK_K 128 or 4 warps take all 255 and spill at 64
    rows (`tests/kernels_sm90.py`).
    """
    rows, in_features = x.shape
    if in_features % 2:
        raise ValueError(f"nf4_matmul: K must be even (got {in_features})")
    if packed.numel() * 2 != out_features * in_features:
        raise ValueError(
            f"nf4_matmul: {packed.numel()} packed bytes do not hold a "
            f"[{out_features}, {in_features}] weight"
        )
    if rows == 0:  # no tile to launch (and none to share the reduction among)
        return x.new_empty(0, out_features)
    x = x if x.stride(-1) == 1 else x.contiguous()
    if block_m is None:
        # fp32 tiles take twice the registers: 16 rows is the most that spills none at sm_90
        block_m = 16 if rows <= 16 or x.dtype == torch.float32 else 32 if rows <= 32 else 64
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(out_features, block_n)
    if split_k is None:
        # Too few tiles for the SMs (decode): share each tile's reduction over K out.
        split_k = power_of_2_at_most(min(4, in_features // 1024, 256 // tiles))
    if split_k > 1:
        out = torch.zeros(rows, out_features, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n), split_k)
    _nf4_matmul_kernel[grid](
        x,
        packed,
        absmax,
        code,
        bias if bias is not None else absmax,
        out,
        rows,
        out_features,
        in_features,
        x.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        PRECISION=dot_precision(x.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if split_k > 1:
        if bias is not None:
            out += bias.float()
        out = out.to(x.dtype)
    return out


@triton.jit
def _dequantize_kernel(
    packed_ptr,  # [N * K / 2] uint8
    absmax_ptr,  # [N * K / 64] fp32
    code_ptr,  # [16] fp32
    out_ptr,  # [N * K] in the output dtype
    num_bytes,
    BLOCK: tl.constexpr,  # bytes per program
):
    byte_index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = byte_index < num_bytes
    byte = tl.load(packed_ptr + byte_index, mask=ok, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + byte_index // 32, mask=ok, other=0.0)  # 32 bytes: 64 weights
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + 2 * byte_index, (tl.load(code_ptr + (byte >> 4)) * scale).to(dtype), ok)
    tl.store(out_ptr + 2 * byte_index + 1, (tl.load(code_ptr + (byte & 15)) * scale).to(dtype), ok)


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    out_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """W[n, k] = code[q[n·K + k]] · absmax[(n·K + k) // 64] as a dense [out_features, K]
    tensor of `dtype`: bitsandbytes' `dequantize_4bit` of the same weight, to the bit."""
    num_bytes = packed.numel()
    out = torch.empty(2 * num_bytes, dtype=dtype, device=packed.device)
    block = 1024
    _dequantize_kernel[(triton.cdiv(num_bytes, block),)](
        packed, absmax, code, out, num_bytes, BLOCK=block
    )
    return out.view(out_features, -1)

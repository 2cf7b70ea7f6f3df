"""Batched LoRA over many adapters in one launch per matrix (SGMV: segmented gather).

    y[i] += (x[i] @ A[s]ᵀ) @ B[s]    for s = slot of the segment holding token i

as `serve.lora_ops.lora_reference` defines it: A: [slots, R, in], B: [slots, R, out] = scale ·
lora_Bᵀ, zero beyond each adapter's rank. Each slot's rank for the module bounds what is read
(mixed ranks in one launch cost their own rank, not R); a slot whose adapter skips the module
(rank 0) costs one exiting program. Tokens of base-only sequences are in no segment.

Two kernels, as in Punica: shrink (x @ Aᵀ into an fp32 [tokens, R] buffer) and expand
(y += buffer @ B). Each program takes BLOCK_M tokens of one segment, so every program
reads one adapter's A or B tile: a decode step over 8 adapters reads each adapter once. A
step without segments launches nothing (the engine never calls it: `LoraBatch` is None).
Modules that read the same input (q/k/v, gate/up) shrink in one launch over their A stacked
along the rank (`lora_sgmv_shared`): x is read once, and one launch replaces three.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from serve.kernels import dot_precision, power_of_2_at_most


@triton.jit
def _tile(segment_ptr, BLOCK_M: tl.constexpr):
    """This program's tile: its first token, its segment's end and the segment's slot."""
    segment = segment_ptr + tl.program_id(0) * 3
    m0 = tl.load(segment) + tl.program_id(1) * BLOCK_M
    return m0, tl.load(segment + 1), tl.load(segment + 2).to(tl.int64)


@triton.jit
def _shrink_kernel(
    x_ptr,  # [tokens, in]
    a_ptr,  # [slots, GROUPS * RANK, in]: the modules' A stacked along the rank
    out_ptr,  # [tokens, GROUPS * RANK] fp32, zeroed when SPLIT_K > 1
    segment_ptr,  # [segments, 3] int32: start, end, slot
    ranks_ptr,  # [GROUPS, slots] int32: each slot's rank per module, 0 if not targeted
    in_features,
    stride_xt,
    stride_as,
    stride_ar,
    stride_ot,
    stride_rg,
    GROUPS: tl.constexpr,  # modules sharing this input
    RANK: tl.constexpr,  # rows of A per module (the slots' padded rank)
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows of the stacked A per program (axis 2 // SPLIT_K picks them)
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,  # programs sharing one tile's reduction over `in`
    PRECISION: tl.constexpr,
):
    m0, end, slot = _tile(segment_ptr, BLOCK_M)
    split, r_tile = tl.program_id(2) % SPLIT_K, tl.program_id(2) // SPLIT_K
    r = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    group = r // RANK
    rank = tl.load(ranks_ptr + group * stride_rg + slot, mask=group < GROUPS, other=0)
    r_ok = r % RANK < rank  # each module's rows up to its own rank (none past the last)
    if (m0 >= end) | (tl.max(r_ok.to(tl.int32), 0) == 0):
        return
    t = m0 + tl.arange(0, BLOCK_M)
    t_ok = t < end
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    x_rows = x_ptr + t.to(tl.int64)[:, None] * stride_xt
    a_rows = a_ptr + slot * stride_as + r[None, :] * stride_ar
    for k0 in range(split * BLOCK_K, in_features, BLOCK_K * SPLIT_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < in_features
        x = tl.load(x_rows + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_rows + k[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc += tl.dot(x, a, input_precision=PRECISION)  # [BLOCK_M, BLOCK_R]
    out = out_ptr + t.to(tl.int64)[:, None] * stride_ot + r[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=t_ok[:, None] & r_ok[None, :])
    else:
        tl.atomic_add(out, acc, mask=t_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(
    s_ptr,  # [tokens, R] fp32 from the shrink
    b_ptr,  # [slots, R, out]
    y_ptr,  # [tokens, out], rows may be strided (a split of a fused projection)
    segment_ptr,
    ranks_ptr,
    out_features,
    stride_st,
    stride_bs,
    stride_br,
    stride_yt,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m0, end, slot = _tile(segment_ptr, BLOCK_M)
    rank = tl.load(ranks_ptr + slot)
    if (m0 >= end) | (rank == 0):
        return
    t = m0 + tl.arange(0, BLOCK_M)
    t_ok = t < end
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < out_features
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # up to this slot's rank, BLOCK_R rows at a time
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < rank
        shrunk = tl.load(
            s_ptr + t.to(tl.int64)[:, None] * stride_st + r[None, :],
            mask=t_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + slot * stride_bs + r[:, None] * stride_br + n[None, :],
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc += tl.dot(shrunk.to(b.dtype), b, input_precision=PRECISION)
    y_tile = y_ptr + t.to(tl.int64)[:, None] * stride_yt + n[None, :]
    mask = t_ok[:, None] & n_ok[None, :]
    y = tl.load(y_tile, mask=mask, other=0.0).to(tl.float32) + acc
    tl.store(y_tile, y.to(y_ptr.dtype.element_ty), mask=mask)


def lora_sgmv(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    segments: torch.Tensor,
    max_segment_len: int,
    ranks: torch.Tensor | None = None,
    **knobs,
) -> None:
    """In place: y[i] += (x[i] @ A[s]ᵀ) @ B[s] for every token i of segment (start, end, s).

    y: [tokens, out] (last dim contiguous); x: [tokens, in]; A: [slots, R, in]; B: [slots, R,
    out]; segments: [segments, 3] int32 rows (start, end, slot) on y's device;
    max_segment_len: the longest segment's tokens, for the grid; ranks: [slots] int32 rank of
    each slot for this module (None: R for every slot); knobs: `lora_sgmv_shared`'s.
    """
    lora_sgmv_shared(
        [y],
        x,
        A,
        [B],
        segments,
        max_segment_len,
        None if ranks is None else ranks[None],
        **knobs,
    )


def lora_sgmv_shared(
    ys: list[torch.Tensor],
    x: torch.Tensor,
    A: torch.Tensor,
    Bs: list[torch.Tensor],
    segments: torch.Tensor,
    max_segment_len: int,
    ranks: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
    block_n: int = 128,
    num_warps: int = 4,
    block_r: int = 64,
) -> None:
    """In place, for each module g of those reading x:
    ys[g][i] += (x[i] @ A[s, gR : (g+1)R]ᵀ) @ Bs[g][s]  for s = slot of token i's segment.

    A: [slots, G·R, in], the G modules' A stacked along the rank; Bs: G tensors [slots, R,
    out_g]; ranks: [G, slots] int32 (None: R everywhere); the rest as in `lora_sgmv`. One
    shrink launch for all G, then one expand per module. Knobs (`bench/gpu_kernels.py`'s
    tune section sweeps them): the shrink's split of `in` over programs (None: by the grid),
    the expand's output columns per program and its warps, and the most rows of A or B one
    program holds at once (a larger rank is tiled over programs in the shrink and looped
    over in the expand).
    """
    num_segments = segments.shape[0]
    if num_segments == 0 or max_segment_len == 0:
        return
    if any(y.stride(-1) != 1 for y in ys):
        raise ValueError("lora_sgmv: y must be contiguous in its last dimension")
    x = x if x.stride(-1) == 1 else x.contiguous()
    A = A if A.stride(-1) == 1 else A.contiguous()
    groups, rank = len(ys), Bs[0].shape[1]
    in_features = A.shape[2]
    if ranks is None:
        ranks = torch.full((groups, A.shape[0]), rank, dtype=torch.int32, device=A.device)
    # Register budgets at sm_90 (tests/kernels_sm90.py): fp32 tiles take twice the registers
    # and their dots run on the CUDA cores, so 32 tokens spill; the expand holds its output
    # tile too, so it takes B 32 rows at a time (16 in fp32).
    fp32 = x.dtype == torch.float32
    block_m = 16 if max_segment_len <= 16 or fp32 else 32
    tiles = triton.cdiv(max_segment_len, block_m)
    shrink_r = min(max(16, triton.next_power_of_2(groups * rank)), block_r)
    r_tiles = triton.cdiv(groups * rank, shrink_r)
    expand_r = min(max(16, triton.next_power_of_2(rank)), 16 if fp32 else 32, block_r)
    if split_k is None:
        # One program per tile leaves SMs idle (a decode step of 64 adapters is 64 programs
        # for 132 SMs, each streaming its A alone): share the reduction out until there are
        # about four programs per SM, keeping each at least 256 of the fan-in.
        programs = num_segments * tiles * r_tiles
        split_k = power_of_2_at_most(min(8, in_features // 256, 512 // programs))
    precision = dot_precision(x.dtype)
    shrunk = (torch.zeros if split_k > 1 else torch.empty)(
        x.shape[0], groups * rank, dtype=torch.float32, device=x.device
    )
    _shrink_kernel[(num_segments, tiles, split_k * r_tiles)](
        x,
        A,
        shrunk,
        segments,
        ranks,
        in_features,
        x.stride(0),
        A.stride(0),
        A.stride(1),
        shrunk.stride(0),
        ranks.stride(0),
        GROUPS=groups,
        RANK=rank,
        BLOCK_M=block_m,
        BLOCK_R=shrink_r,
        BLOCK_K=64,
        SPLIT_K=split_k,
        PRECISION=precision,
    )
    for g, (y, B) in enumerate(zip(ys, Bs, strict=True)):
        B = B if B.stride(-1) == 1 else B.contiguous()
        out_features = B.shape[2]
        _expand_kernel[(num_segments, tiles, triton.cdiv(out_features, block_n))](
            shrunk[:, g * rank :],
            B,
            y,
            segments,
            ranks[g],
            out_features,
            shrunk.stride(0),
            B.stride(0),
            B.stride(1),
            y.stride(0),
            BLOCK_M=block_m,
            BLOCK_R=expand_r,
            BLOCK_N=block_n,
            PRECISION=precision,
            num_warps=num_warps,
        )

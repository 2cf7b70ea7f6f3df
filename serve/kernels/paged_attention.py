"""Paged attention as one Triton launch for a whole step: decodes and prefill chunks together.

    out[t, h] = softmax(q[t, h] · K[s, :p+1, h // G]ᵀ · scale) · V[s, :p+1, h // G]

for s = seq(t), p = pos(t), G = heads / kv_heads (GQA); key n of sequence s is read from slot
block_table[n // block_size] * block_size + n % block_size. The plain-torch reference is
`serve.attention.paged_attention`; this reads the same `AttentionMetadata` (its per-sequence
`block_tables`, `query_start` and `context_lens`), not the padded groups.

One program computes BLOCK_M new tokens of one sequence for all G query heads of one KV
head, so each K/V tile is read once for its G heads (rows = token x head pairs), with an
online softmax over tiles of BLOCK_N keys. A tile stops at the last key its latest token
may see, so chunked prefill skips the masked upper triangle.

A decode step of few sequences would give few programs (one Llama-3-8B sequence: 8, for
132 SMs), so decode-only steps split each sequence's keys over SPLITS programs
(flash-decoding): each writes its unnormalized output with its running max and sum, and
`_combine_kernel` merges them, out = Σ 2^(m_s - M) acc_s / Σ 2^(m_s - M) l_s.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from serve.kernels import dot_precision, power_of_2_at_most

_LOG2E = 1.4426950408889634


# stride_bt: the step's block-table width, which changes from step to step; specializing on
# it (== 1, divisible by 16) would only add compiles.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_attention_kernel(
    q_ptr,  # [tokens, heads, dim]
    k_cache_ptr,  # [slots, kv_heads, dim]
    v_cache_ptr,
    out_ptr,  # [tokens, heads, dim]
    block_tables_ptr,  # [seqs, width] int32
    query_start_ptr,  # [seqs + 1] int32
    context_lens_ptr,  # [seqs] int32
    qk_scale,  # softmax scale · log2(e): exp2 instead of exp
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_bt,
    block_size,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_M: tl.constexpr,  # new tokens per program
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    PRECISION: tl.constexpr,
    SPLITS: tl.constexpr,  # programs sharing one tile's keys (decode only), else 1
    partial_acc_ptr,  # [tokens, heads, SPLITS, BLOCK_D] fp32 when SPLITS > 1
    partial_ml_ptr,  # [tokens, heads, SPLITS, 2] fp32: running max and sum
):
    seq = tl.program_id(0)
    m0 = (tl.program_id(1) // SPLITS) * BLOCK_M
    split = tl.program_id(1) % SPLITS
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if m0 >= q_len:
        return
    context = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M * GROUP_PAD)
    token = m0 + rows // GROUP_PAD  # index among the sequence's new tokens
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (token < q_len) & (rows % GROUP_PAD < GROUP)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_offsets = (q_start + token).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_ptr + q_offsets + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = context - q_len + token  # [rows] position of each row's token in its sequence

    m_i = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, BLOCK_D], tl.float32)
    end = tl.minimum(context, context - q_len + m0 + BLOCK_M)  # keys the tile's rows may see
    # this program's share of them: whole tiles, so splits never share one
    per_split = tl.cdiv(tl.cdiv(end, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(end, start + per_split)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        block = tl.load(block_tables_ptr + seq * stride_bt + n // block_size, mask=n_ok, other=0)
        slot = block.to(tl.int64) * block_size + n % block_size
        k = tl.load(
            k_cache_ptr + slot[None, :] * stride_ks + kv_head * stride_kh + d[:, None],
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        # Every row sees key 0 in the first tile, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if SPLITS == 1:
        acc = acc / l_i[:, None]
        o_offsets = (q_start + token).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(
            out_ptr + o_offsets + d[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:  # a split past the context leaves max -inf and sum 0: it weighs nothing
        heads = tl.num_programs(2) * GROUP
        part = ((q_start + token).to(tl.int64) * heads + head) * SPLITS + split  # [rows]
        tl.store(partial_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
        tl.store(partial_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(partial_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(
    partial_acc_ptr,  # [tokens, heads, SPLITS, BLOCK_D] fp32
    partial_ml_ptr,  # [tokens, heads, SPLITS, 2] fp32
    out_ptr,  # [tokens, heads, dim]
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # SPLITS rounded up to a power of two
):
    """out[t, h] = Σ_s 2^(m_s - M) acc_s / Σ_s 2^(m_s - M) l_s over the splits of (t, h)."""
    token, head = tl.program_id(0), tl.program_id(1)
    part = (token.to(tl.int64) * tl.num_programs(1) + head) * SPLITS + tl.arange(0, BLOCK_S)
    s_ok = tl.arange(0, BLOCK_S) < SPLITS
    maxes = tl.load(partial_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
    sums = tl.load(partial_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    weight = tl.exp2(maxes - tl.max(maxes, 0))  # split 0 always holds keys: a finite max
    d = tl.arange(0, BLOCK_D)
    acc_ptrs = partial_acc_ptr + part[:, None] * BLOCK_D + d[None, :]
    acc = tl.load(acc_ptrs, mask=s_ok[:, None], other=0.0)  # masked lanes are undefined, not 0
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(sums * weight, 0)
    o = out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + d
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def decode_splits(programs: int, max_context_len: int, block_n: int, sms: int) -> int:
    """Key splits for a decode step of `programs` (sequences x KV heads) tiles on `sms` SMs
    (0 off a GPU: 1): enough for two programs per SM, each with at least 4 tiles of keys; a
    power of two."""
    return power_of_2_at_most(min(2 * sms // programs, max_context_len // (4 * block_n), 32))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    """SMs of a GPU, asked once: every layer of every decode step wants it."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def paged_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta,
    scale: float,
    block_n: int | None = None,
    num_warps: int = 8,
    splits: int | None = None,
) -> torch.Tensor:
    """Drop-in for `serve.attention.paged_attention`: write this step's K/V into the cache,
    then attend. q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]; caches: [slots,
    kv_heads, dim]; meta: AttentionMetadata. Returns [tokens, heads, dim].

    num_warps 8: at 4 the gathered K/V tiles' addresses need more than 255 registers and
    spill (head dim 128; `tests/kernels_sm90.py` reports registers and spills). block_n: keys
    per tile (None: 64; 32 in fp32, whose tiles take twice the registers). splits:
    programs per decode tile's keys (None: `decode_splits`; prefill steps take 1)."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q)  # the kernels store along head dim at stride 1, as q's now is
    seqs = meta.context_lens.shape[0]
    if tokens == 0 or seqs == 0:
        return out
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    # tl.dot wants at least 16 rows; decode tiles hold one real token, prefill tiles more.
    wide = q.element_size() > 2  # fp32: half the rows and keys per tile spill no register
    rows = 16 if meta.max_query_len == 1 else 32 if wide else 64
    block_n = block_n or (32 if wide else 64)
    block_m = max(1, rows // group_pad)
    block_d = max(16, triton.next_power_of_2(dim))
    if meta.max_query_len != 1:
        splits = 1  # a split could hold no key a prefill row may see
    elif splits is None:
        sms = _multiprocessors(q.device.index or 0) if q.device.type == "cuda" else 0
        splits = decode_splits(seqs * kv_heads, meta.max_context_len, block_n, sms)
    partial_acc = partial_ml = out  # unused at one split
    if splits > 1:
        partial_acc = torch.empty(tokens, heads, splits, block_d, device=q.device)
        partial_ml = torch.empty(tokens, heads, splits, 2, device=q.device)
    grid = (seqs, triton.cdiv(meta.max_query_len, block_m) * splits, kv_heads)
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        meta.block_tables,
        meta.query_start,
        meta.context_lens,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        meta.block_tables.stride(0),
        meta.block_size,
        HEAD_DIM=dim,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PRECISION=dot_precision(q.dtype),
        SPLITS=splits,
        partial_acc_ptr=partial_acc,
        partial_ml_ptr=partial_ml,
        num_warps=num_warps,
    )
    if splits > 1:
        _combine_kernel[(tokens, heads)](
            partial_acc,
            partial_ml,
            out,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=dim,
            BLOCK_D=block_d,
            SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits),
        )
    return out

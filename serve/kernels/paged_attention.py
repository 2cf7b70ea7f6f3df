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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from serve.kernels import dot_precision

_LOG2E = 1.4426950408889634


@triton.jit
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
):
    seq = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
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
    for n0 in range(0, end, BLOCK_N):
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
    acc = acc / l_i[:, None]
    o_offsets = (q_start + token).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(
        out_ptr + o_offsets + d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def paged_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta,
    scale: float,
    block_n: int = 64,
    num_warps: int = 8,
) -> torch.Tensor:
    """Drop-in for `serve.attention.paged_attention`: write this step's K/V into the cache,
    then attend. q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]; caches: [slots,
    kv_heads, dim]; meta: AttentionMetadata. Returns [tokens, heads, dim].

    num_warps 8: at 4 the gathered K/V tiles' addresses need more than 255 registers and
    spill (head dim 128; `tests/kernels_sm90.py` reports registers and spills)."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    out = torch.empty_like(q)
    seqs = meta.context_lens.shape[0]
    if tokens == 0 or seqs == 0:
        return out
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    # tl.dot wants at least 16 rows; decode tiles hold one real token, prefill tiles more.
    rows = 16 if meta.max_query_len == 1 else 64
    block_m = max(1, rows // group_pad)
    q = q if q.stride(-1) == 1 else q.contiguous()
    grid = (seqs, triton.cdiv(meta.max_query_len, block_m), kv_heads)
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
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        PRECISION=dot_precision(q.dtype),
        num_warps=num_warps,
    )
    return out

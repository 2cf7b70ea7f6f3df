"""Paged attention: K/V live in a pool of fixed-size blocks, read through block tables.

`paged_attention` is the plain-torch reference a GPU kernel replaces: its semantics are
    out[t] = softmax(q[t] · K[seq(t), :pos(t)+1]ᵀ · scale) · V[seq(t), :pos(t)+1]
with K, V of a sequence gathered from the cache slots its block table names. On CUDA the
Triton kernel `serve.kernels.paged_attention` replaces it, reading the metadata's compact
tables instead of the padded groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences attended in one padded batch (decodes together, prefill chunks together)."""

    # [seqs, max_q] flat token of each query row; padding rows repeat the sequence's last token
    token_index: torch.Tensor
    # [seqs, ctx_blocks] block table of each sequence, padded with block 0 (masked out)
    key_blocks: torch.Tensor
    mask: torch.Tensor  # [seqs, 1, max_q, ctx_blocks * block_size] True where q may attend k
    rows: torch.Tensor  # [real rows] index into the flattened [seqs * max_q] query rows
    dest: torch.Tensor  # [real rows] the token each real row is the output of


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [num_tokens] position of each new token in its sequence
    slot_mapping: torch.Tensor  # [num_tokens] cache slot that each new token's K/V is written to
    # padded batches of the reference op; None when built for the kernel only
    groups: list[AttentionGroup] | None
    block_size: int
    # What the kernel (serve.kernels.paged_attention) reads instead of the groups:
    block_tables: torch.Tensor  # [seqs, width] int32 block table of each sequence, 0-padded
    query_start: torch.Tensor  # [seqs + 1] int32 first token of each sequence in the batch
    context_lens: torch.Tensor  # [seqs] int32 keys each sequence sees after this step
    max_query_len: int  # most new tokens of one sequence
    max_context_len: int  # most keys one sequence sees (an upper bound is enough)


def build_attention_metadata(
    block_tables: list[list[int]],
    num_computed: list[int],
    num_new: list[int],
    block_size: int,
    device,
    padded_groups: bool = True,
) -> AttentionMetadata:
    """Slot mapping and padded attention groups of one step (pure: tables in, indices out).

    Sequence s computes tokens at positions num_computed[s] .. num_computed[s]+num_new[s]-1,
    laid out one sequence after another in the flat batch. Without `padded_groups` (the
    kernel's case) the dense masks of the reference op are not built.
    """
    offsets, total = [], 0
    for n in num_new:
        offsets.append(total)
        total += n
    starts = torch.tensor(offsets, dtype=torch.long)  # long when empty too: an index
    tables = torch.from_numpy(padded_tables(block_tables))
    computed = torch.tensor(num_computed, dtype=torch.long)
    new = torch.tensor(num_new, dtype=torch.long)

    seq_of_token = torch.repeat_interleave(torch.arange(len(num_new)), new)
    position = computed[seq_of_token] + torch.arange(total) - starts[seq_of_token]
    slot_mapping = _slots(tables[seq_of_token], position[:, None], block_size)[:, 0]

    groups = None
    if padded_groups:
        decodes = [i for i, n in enumerate(num_new) if n == 1]
        chunks = [i for i, n in enumerate(num_new) if n > 1]
        groups = [
            _group(tables[idx], computed[idx], new[idx], starts[idx], block_size, device)
            for idx in (torch.tensor(m) for m in (decodes, chunks) if m)
        ]
    context = computed + new  # keys each sequence sees after this step
    return AttentionMetadata(
        position.to(device),
        slot_mapping.to(device),
        groups,
        block_size,
        block_tables=tables.to(device=device, dtype=torch.int32),
        query_start=torch.tensor([*offsets, total], dtype=torch.int32, device=device),
        context_lens=context.to(device=device, dtype=torch.int32),
        max_query_len=max(num_new, default=0),
        max_context_len=int(context.max()) if num_new else 0,
    )


def padded_tables(block_tables: list[list[int]]) -> np.ndarray:
    """[seqs, longest table] int64, each row a block table padded with block 0.

    Row by row through numpy: ~5x faster than `torch.tensor` of padded lists, which at batch
    64 and 4k-token contexts (256 blocks each) took ~1 ms of host time every step.
    """
    width = max((len(t) for t in block_tables), default=0)
    tables = np.zeros((len(block_tables), width), dtype=np.int64)
    for row, table in zip(tables, block_tables, strict=True):
        row[: len(table)] = table
    return tables


def _slots(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position: tables [rows, blocks], positions [rows, n] -> [rows, n]."""
    block = torch.gather(tables, 1, positions // block_size)
    return block * block_size + positions % block_size


def _group(tables, computed, new, starts, block_size, device) -> AttentionGroup:
    max_q = int(new.max())
    context = computed + new  # keys each sequence sees after this step
    ctx_blocks = -(-int(context.max()) // block_size)
    j = torch.arange(max_q)
    valid = j[None, :] < new[:, None]  # [seqs, max_q]
    token_index = starts[:, None] + torch.minimum(j[None, :], new[:, None] - 1)
    key_blocks = tables[:, :ctx_blocks]  # whole blocks: a few large copies, not one per key
    key_pos = torch.arange(ctx_blocks * block_size)
    query_pos = computed[:, None] + j[None, :]  # [seqs, max_q]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # causal, within the context
    mask &= valid[:, :, None]
    mask[:, :, 0] |= ~valid  # padding rows attend one key instead of none (no NaN)
    rows = valid.flatten().nonzero().squeeze(1)
    return AttentionGroup(
        token_index.to(device),
        key_blocks.to(device),
        mask.unsqueeze(1).to(device),
        rows.to(device),
        token_index.flatten()[rows].to(device),
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend. q: [tokens, heads, dim]; k, v:
    [tokens, kv_heads, dim]; caches: [slots, kv_heads, dim]. Returns [tokens, heads, dim]."""
    if meta.groups is None:
        raise ValueError("paged_attention: metadata built without padded_groups")
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    k_blocks = k_cache.view(-1, meta.block_size, *k_cache.shape[1:])  # [blocks, size, kv, dim]
    v_blocks = v_cache.view(-1, meta.block_size, *v_cache.shape[1:])
    out = torch.empty_like(q)
    for g in meta.groups:
        seqs, max_q = g.token_index.shape
        # index_select, not advanced indexing: on CPU it copies whole rows, many times faster
        queries = q.index_select(0, g.token_index.flatten()).unflatten(0, (seqs, max_q))
        queries = queries.transpose(1, 2)  # [seqs, heads, max_q, dim]
        blocks = g.key_blocks.flatten()
        keys = k_blocks.index_select(0, blocks).view(seqs, -1, *k_cache.shape[1:])
        values = v_blocks.index_select(0, blocks).view(seqs, -1, *v_cache.shape[1:])
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [seqs, kv, ctx, dim]
        if q.device.type == "cpu" and q.dtype != torch.float32:
            # torch's CPU attention runs bf16 4x slower than fp32 (bench/cpu_notes.md)
            queries, keys, values = queries.float(), keys.float(), values.float()
        o = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=g.mask, scale=scale, enable_gqa=True
        )
        o = o.transpose(1, 2).flatten(0, 1)  # [seqs * max_q, heads, dim]
        out.index_copy_(0, g.dest, o.index_select(0, g.rows).to(out.dtype))
    return out

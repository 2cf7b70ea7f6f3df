"""Paged attention metadata (exact slots) and attention through block tables against dense."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve.attention import build_attention_metadata, paged_attention


def test_slot_mapping_follows_block_tables():
    meta = build_attention_metadata(
        [[7, 2], [5]], num_computed=[3, 0], num_new=[2, 3], block_size=4, device="cpu"
    )
    # seq 0 writes positions 3, 4 -> block 7 offset 3, block 2 offset 0; seq 1 positions 0..2
    assert meta.slot_mapping.tolist() == [31, 8, 20, 21, 22]
    assert len(meta.groups) == 1  # both are chunks of more than one token


def test_an_empty_step_writes_and_attends_nothing():
    """Its slot mapping is an index (long) even with no token, as the K/V write needs."""
    meta = build_attention_metadata([], num_computed=[], num_new=[], block_size=4, device="cpu")
    assert meta.slot_mapping.dtype == torch.long and meta.slot_mapping.numel() == 0
    cache = torch.zeros(2, 3 * 4, 2, 8)  # K and V: slots of 3 blocks of 4, 2 heads of 8
    q, kv = torch.zeros(0, 4, 8), torch.zeros(0, 2, 8)
    assert paged_attention(q, kv, kv, cache[0], cache[1], meta, 8**-0.5).shape == (0, 4, 8)


def test_decodes_and_prefills_form_separate_groups():
    meta = build_attention_metadata(
        [[0], [1, 2], [3]], num_computed=[2, 5, 0], num_new=[1, 1, 3], block_size=4, device="cpu"
    )
    decode, prefill = meta.groups
    assert decode.token_index.tolist() == [[0], [1]]
    assert decode.key_blocks.tolist() == [[0, 0], [1, 2]]  # seq 0 padded with block 0
    # seq 0 sees positions 0..2 of block 0; seq 1 sees positions 0..5 of blocks 1, 2
    assert decode.mask[:, 0, 0].tolist() == [[True] * 3 + [False] * 5, [True] * 6 + [False] * 2]
    assert prefill.token_index.tolist() == [[2, 3, 4]]


def test_paged_attention_equals_dense_causal_attention():
    torch.manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 4
    lengths = [9, 1, 6]
    # Each sequence's blocks are scattered over the pool.
    tables = [[5, 0, 3], [1], [4, 2]]
    cache_k = torch.zeros(6 * block, kv_heads, dim)
    cache_v = torch.zeros(6 * block, kv_heads, dim)
    qs, ks, vs = ([torch.randn(n, h, dim) for n in lengths] for h in (heads, kv_heads, kv_heads))
    # First step: the prompts minus their last token; second step: the last tokens, one each.
    for computed, new in ((0, [n - 1 for n in lengths]), (1, [1, 1, 1])):
        done = [n - 1 for n in lengths] if computed else [0, 0, 0]
        idx = [range(d, d + k) for d, k in zip(done, new, strict=True)]
        q = torch.cat([qs[i][list(r)] for i, r in enumerate(idx)])
        k = torch.cat([ks[i][list(r)] for i, r in enumerate(idx)])
        v = torch.cat([vs[i][list(r)] for i, r in enumerate(idx)])
        meta = build_attention_metadata(tables, done, new, block, "cpu")
        out = paged_attention(q, k, v, cache_k, cache_v, meta, scale=dim**-0.5)
    # `out` holds the last step: the final token of every sequence, against dense attention.
    for i in range(len(lengths)):
        expected = F.scaled_dot_product_attention(
            qs[i].transpose(0, 1)[None],
            ks[i].transpose(0, 1)[None],
            vs[i].transpose(0, 1)[None],
            is_causal=True,
            scale=dim**-0.5,
            enable_gqa=True,
        )[0].transpose(0, 1)
        torch.testing.assert_close(out[i], expected[-1], rtol=1e-5, atol=1e-5)


def test_kernel_tables_are_compact_and_skip_the_padded_groups():
    meta = build_attention_metadata(
        [[7, 2], [5], [1, 4, 6]],
        num_computed=[3, 0, 9],
        num_new=[2, 3, 1],
        block_size=4,
        device="cpu",
        padded_groups=False,
    )
    assert meta.groups is None
    assert meta.block_tables.tolist() == [[7, 2, 0], [5, 0, 0], [1, 4, 6]]
    assert meta.query_start.tolist() == [0, 2, 5, 6]
    assert meta.context_lens.tolist() == [5, 3, 10]
    assert meta.max_query_len == 3
    assert meta.slot_mapping.tolist() == [31, 8, 20, 21, 22, 25]  # as with the groups

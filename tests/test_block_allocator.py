"""Paged KV bookkeeping with exact block ids: allocation, freeing order, the prefix cache."""

from __future__ import annotations

import pytest

from serve.block_allocator import BlockAllocator, block_hashes
from serve.sampling_params import SamplingParams
from serve.sequence import Sequence


def seq(rid: str, tokens: list[int], adapter: str | None = None) -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), SamplingParams(), adapter_uid=adapter)


def compute(allocator: BlockAllocator, s: Sequence, n: int) -> None:
    """What a step does for `s`: blocks for n tokens, computed, published."""
    allocator.append(s, n)
    s.num_computed_tokens += n
    allocator.commit(s, n)


def test_blocks_are_allocated_as_tokens_arrive_and_freed_tail_first():
    a = BlockAllocator(num_blocks=6, block_size=4)
    s = seq("a", range(10))
    assert a.blocks_needed(s, 10) == 3
    compute(a, s, 10)
    assert s.block_table == [0, 1, 2]
    s.token_ids.append(99)
    compute(a, s, 1)  # position 10 fits in block 2
    assert s.block_table == [0, 1, 2]
    s.token_ids += [100, 101]
    compute(a, s, 2)  # positions 11, 12: a new block
    assert s.block_table == [0, 1, 2, 3]
    assert a.num_free_blocks == 2
    a.free(s)
    assert s.block_table == [] and s.num_computed_tokens == 0
    # Unhashed tail block 3 is reused first, then the other free blocks, then cached ones
    # from the tail of the freed sequence backwards.
    assert list(a.free_blocks) == [3, 4, 5, 2, 1, 0]


def test_can_append_says_no_when_blocks_run_out():
    a = BlockAllocator(num_blocks=2, block_size=4)
    s = seq("a", range(9))
    assert not a.can_append(s, 9)
    assert a.can_append(s, 8)


def test_prefix_is_reused_only_by_the_same_adapter_version():
    a = BlockAllocator(num_blocks=16, block_size=4)
    first = seq("a", range(10), adapter="faq/1")
    compute(a, first, 10)  # blocks 0, 1 full and published, block 2 partial
    same = seq("b", [*range(8), 50, 51, 52], adapter="faq/1")
    assert a.match_prefix(same) == 8
    assert same.block_table == [0, 1]
    assert a.ref_counts[:2] == [2, 2]
    other_version = seq("c", range(10), adapter="faq/2")
    assert a.match_prefix(other_version) == 0
    base = seq("d", range(10))
    assert a.match_prefix(base) == 0


def test_a_fully_cached_prompt_still_computes_its_last_token():
    a = BlockAllocator(num_blocks=8, block_size=4)
    compute(a, seq("a", range(8)), 8)
    again = seq("b", range(8))
    assert a.match_prefix(again) == 4  # not 8: the last token's logits are needed
    assert again.num_uncomputed_tokens == 4


def test_freed_cached_blocks_are_reused_until_evicted():
    a = BlockAllocator(num_blocks=3, block_size=4)
    first = seq("a", range(8))
    compute(a, first, 8)
    a.free(first)
    second = seq("b", [*range(4), 7, 7, 7, 7, 7])
    assert a.match_prefix(second) == 4 and second.block_table == [0]
    compute(a, second, 5)  # needs two more blocks: evicts the cached block 1
    assert second.block_table == [0, 2, 1]
    assert a.match_prefix(seq("c", range(8))) == 4  # block 0 only; block 1 now holds other data


@pytest.mark.parametrize("n", [0, 3, 4, 9])
def test_block_hashes_chain_and_extend(n):
    tokens = list(range(n))
    full = block_hashes(tokens, 4, "x", [])
    assert len(full) == n // 4
    assert block_hashes(tokens, 4, "x", full[:1]) == full
    assert full != block_hashes(tokens, 4, "y", []) or n < 4

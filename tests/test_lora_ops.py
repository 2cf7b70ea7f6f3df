"""The batched LoRA op against its per-token reference, and segment tables."""

from __future__ import annotations

import pytest
import torch

from serve.lora_ops import (
    LoraBatch,
    chunk_rows,
    lora_gathered,
    lora_gathered_shared,
    lora_reference,
    lora_segments,
    segments_of,
    slot_rows,
)


@pytest.mark.parametrize(
    ("slots", "tokens", "expected"),
    [
        ([], [], []),
        ([-1, -1], [3, 1], []),
        ([0], [5], [(0, 5, 0)]),
        ([0, 0, 0], [2, 1, 1], [(0, 4, 0)]),
        ([-1, 0, 1, 2], [1, 2, 1, 3], [(1, 3, 0), (3, 4, 1), (4, 7, 2)]),
        ([1, -1, 1], [1, 1, 1], [(0, 1, 1), (2, 3, 1)]),
        ([0, 0], [0, 2], [(0, 2, 0)]),
    ],
    ids=["empty", "base-only", "single", "all-same", "all-different", "split", "zero-tokens"],
)
def test_segments_of(slots, tokens, expected):
    assert segments_of(slots, tokens) == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segmented_and_gathered_lora_equal_the_per_token_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    slots, max_rank, fan_in, fan_out = 5, 16, 37, 23
    ranks = [16, 4, 0, 7, 1]  # mixed; slot 2 does not target this module
    A = torch.zeros(slots, max_rank, fan_in)
    B = torch.zeros(slots, max_rank, fan_out)
    for s, r in enumerate(ranks):
        A[s, :r] = torch.randn(r, fan_in, generator=gen)
        B[s, :r] = torch.randn(r, fan_out, generator=gen)
    seq_slots = [-1, 0, 0, 1, 2, 3, 4, -1]
    seq_tokens = [3, 1, 5, 2, 2, 1, 4, 2]
    slot_of_token = torch.repeat_interleave(torch.tensor(seq_slots), torch.tensor(seq_tokens))
    x = torch.randn(len(slot_of_token), fan_in, generator=gen)
    y = torch.randn(len(slot_of_token), fan_out, generator=gen)
    expected = lora_reference(y, x, A, B, slot_of_token)
    segments = segments_of(seq_slots, seq_tokens)

    by_segments = y.clone()
    lora_segments(by_segments, x, A, B, ranks, segments)
    torch.testing.assert_close(by_segments, expected, rtol=1e-5, atol=1e-5)

    gathered = y.clone()
    lora_gathered(gathered, x, A, B, LoraBatch.build(seq_slots, seq_tokens, "cpu"))
    torch.testing.assert_close(gathered, expected, rtol=1e-5, atol=1e-5)

    base_rows = slot_of_token == -1
    assert torch.equal(by_segments[base_rows], y[base_rows])  # base-only tokens are untouched
    assert torch.equal(gathered[base_rows], y[base_rows])


def test_chunks_cut_runs_to_one_width_and_pad_with_the_last_token():
    # runs of 4, 1 and 7 tokens: width ceil(12 / 3) = 4
    tokens, slots, rows, dest = chunk_rows([(0, 4, 0), (4, 5, 2), (5, 12, 1)])
    assert tokens.tolist() == [[0, 1, 2, 3], [4, 4, 4, 4], [5, 6, 7, 8], [9, 10, 11, 11]]
    assert slots.tolist() == [0, 2, 1, 1]
    assert dest.tolist() == list(range(12))
    assert rows.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14]


def test_batch_gathers_only_when_there_are_several_runs():
    assert LoraBatch.build([-1, -1], [5, 1], "cpu") is None
    single = LoraBatch.build([0, 0], [400, 1], "cpu")
    assert single.chunk_tokens is None and single.segments == [(0, 401, 0)]
    decode = LoraBatch.build([0, 0, 1, 1, 2, 2, 3, 3], [1] * 8, "cpu")
    assert decode.chunk_tokens.shape == (4, 2) and decode.chunk_slots is None  # chunk c: slot c
    # one busy slot next to short ones: one chunk per slot would pad past the tokens
    uneven = LoraBatch.build([0, 1, 2, 3], [9, 1, 1, 1], "cpu")
    assert uneven.chunk_slots.tolist() == [0, 0, 0, 1, 2, 3]


@pytest.mark.parametrize(
    ("segments", "expected"),
    [
        ([(0, 2, 0), (2, 4, 1)], ([[0, 1], [2, 3]], [0, 1, 2, 3])),
        ([(0, 1, 1), (1, 3, 0), (3, 4, 1)], ([[1, 2], [0, 3]], [0, 1, 2, 3])),
        ([(1, 3, 2), (3, 4, 0)], ([[3, 3], [1, 1], [1, 2]], [0, 4, 5])),
        ([(0, 3, 0)], ([[0, 1, 2]], [0, 1, 2])),
        ([(0, 5, 3)], None),
        ([(0, 6, 0), (6, 7, 1), (7, 8, 2)], None),
    ],
    ids=["all-different", "slot-split", "empty-slot", "all-same", "high-slot", "one-busy"],
)
def test_slot_rows_give_each_slot_one_chunk_of_its_tokens(segments, expected):
    got = slot_rows(segments)
    if expected is None:
        assert got is None
        return
    tokens, rows, dest = got
    assert tokens.tolist() == expected[0]
    assert rows.tolist() == expected[1]
    assert dest.tolist() == tokens.flatten()[rows].tolist()
    assert sorted(dest.tolist()) == [t for a, b, _ in segments for t in range(a, b)]


@pytest.mark.parametrize(
    ("seq_slots", "seq_tokens"),
    [([0, 1, 2, 0, 1, -1], [1] * 6), ([2, 0, 0, 1, -1], [1, 1, 1, 9, 2])],
    ids=["by-slot", "chunked"],
)
def test_shared_shrink_equals_each_module_against_the_reference(seq_slots, seq_tokens):
    gen = torch.Generator().manual_seed(0)
    slots, max_rank, fan_in, fan_outs = 3, 4, 11, [7, 5, 5]
    A = torch.randn(slots, len(fan_outs) * max_rank, fan_in, generator=gen)
    A[1, max_rank - 1 :: max_rank] = 0  # slot 1 is of a lower rank (zero-padded)
    Bs = [torch.randn(slots, max_rank, out, generator=gen) for out in fan_outs]
    slot_of_token = torch.repeat_interleave(torch.tensor(seq_slots), torch.tensor(seq_tokens))
    x = torch.randn(len(slot_of_token), fan_in, generator=gen)
    fused = torch.randn(len(slot_of_token), sum(fan_outs), generator=gen)
    expected = [
        lora_reference(y, x, A[:, j * max_rank : (j + 1) * max_rank], B, slot_of_token)
        for j, (y, B) in enumerate(zip(fused.split(fan_outs, dim=1), Bs, strict=True))
    ]
    ys = list(fused.split(fan_outs, dim=1))  # views of one fused projection, as in the model
    batch = LoraBatch.build(seq_slots, seq_tokens, "cpu")
    assert (batch.chunk_slots is None) == (seq_tokens == [1] * 6)
    lora_gathered_shared(ys, x, A, Bs, batch)
    for y, ref in zip(ys, expected, strict=True):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_kernel_batch_is_the_segment_table():
    batch = LoraBatch.build([-1, 0, 0, 2, -1, 1], [3, 1, 4, 2, 1, 6], "cpu", kernel=True)
    assert batch.segment_table.tolist() == [[3, 8, 0], [8, 10, 2], [11, 17, 1]]
    assert batch.segment_table.dtype == torch.int32
    assert batch.max_segment_len == 6
    assert batch.chunk_tokens is None  # the gathered chunks are not built
    assert LoraBatch.build([-1], [5], "cpu", kernel=True) is None

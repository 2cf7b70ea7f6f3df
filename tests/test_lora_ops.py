"""The batched LoRA op against its per-token reference, and segment tables."""

from __future__ import annotations

import pytest
import torch

from serve.lora_ops import (
    LoraBatch,
    lora_masked,
    lora_reference,
    lora_segments,
    segments_of,
    slot_mask,
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
def test_segmented_and_masked_lora_equal_the_per_token_reference(seed):
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

    masked = y.clone()
    lora_masked(masked, x, A, B, slot_mask(segments, len(x), slots, max_rank, "cpu"))
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5)

    base_rows = slot_of_token == -1
    assert torch.equal(by_segments[base_rows], y[base_rows])  # base-only tokens are untouched
    assert torch.equal(masked[base_rows], y[base_rows])


def test_batch_uses_the_mask_for_decode_and_segments_for_prefill():
    decode = LoraBatch.build([0, 1, 2, 3] * 8, [1] * 32, 16, "cpu")
    assert decode.mask is not None and decode.mask.shape == (32, 4 * 16)
    prefill = LoraBatch.build([0, 1], [400, 300], 16, "cpu")
    assert prefill.mask is None and prefill.segments == [(0, 400, 0), (400, 700, 1)]
    assert LoraBatch.build([-1, -1], [5, 1], 16, "cpu") is None

"""The batched LoRA op against its per-token reference, and segment tables."""

from __future__ import annotations

import pytest
import torch

from serve.lora_ops import lora_reference, lora_segments, segments_of


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
def test_segmented_lora_equals_the_per_token_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    slots, max_rank, fan_in, fan_out = 5, 16, 37, 23
    ranks = [16, 4, 0, 7, 1]  # mixed; slot 2 does not target this module
    A = torch.zeros(slots, max_rank, fan_in)
    B = torch.zeros(slots, fan_out, max_rank)
    for s, r in enumerate(ranks):
        A[s, :r] = torch.randn(r, fan_in, generator=gen)
        B[s, :, :r] = torch.randn(fan_out, r, generator=gen)
    scales = [0.5, 2.0, 1.0, 0.25, 4.0]
    seq_slots = [-1, 0, 0, 1, 2, 3, 4, -1]
    seq_tokens = [3, 1, 5, 2, 2, 1, 4, 2]
    slot_of_token = torch.repeat_interleave(torch.tensor(seq_slots), torch.tensor(seq_tokens))
    x = torch.randn(len(slot_of_token), fan_in, generator=gen)
    y = torch.randn(len(slot_of_token), fan_out, generator=gen)
    expected = lora_reference(y, x, A, B, torch.tensor(scales), slot_of_token)
    got = y.clone()
    lora_segments(got, x, A, B, ranks, scales, segments_of(seq_slots, seq_tokens))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    base_rows = slot_of_token == -1
    assert torch.equal(got[base_rows], y[base_rows])  # base-only tokens are untouched

"""The batched LoRA op: many adapters, mixed ranks, one batch, no weight merging.

Semantics (for every token i whose sequence has an adapter in slot s = slot_of_token[i]):
    y[i] += scale[s] * (x[i] @ A[s]ᵀ) @ B[s]ᵀ
A: [slots, max_rank, in], B: [slots, out, max_rank], zero beyond each adapter's rank.

The scheduler orders the batch by slot, so each adapter's tokens are one contiguous segment
(SGMV): the work is two matmuls per segment at the adapter's own rank, never a loop over
sequences. `lora_reference` gathers per token instead; tests compare the two, and a GPU
kernel replaces `lora_segments` behind the same arguments.
"""

from __future__ import annotations

import torch


def segments_of(slots: list[int], num_tokens: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, slot) token ranges of consecutive sequences sharing an adapter slot.

    slots[i] and num_tokens[i] describe sequence i of the batch; slot -1 (base only) gets no
    segment. Pure, so it is tested on tables.
    """
    segments: list[tuple[int, int, int]] = []
    start = 0
    for slot, n in zip(slots, num_tokens, strict=True):
        if n and slot >= 0:
            if segments and segments[-1][2] == slot and segments[-1][1] == start:
                segments[-1] = (segments[-1][0], start + n, slot)
            else:
                segments.append((start, start + n, slot))
        start += n
    return segments


def lora_segments(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    ranks: list[int],
    scales: list[float],
    segments: list[tuple[int, int, int]],
) -> None:
    """In place: y[start:end] += scale[s] * (x[start:end] @ A[s, :r]ᵀ) @ B[s, :, :r]ᵀ per segment,
    r = ranks[s]; a slot with rank 0 does not target this module."""
    for start, end, slot in segments:
        r = ranks[slot]
        if r:
            shrunk = x[start:end] @ A[slot, :r].T  # [tokens, r]
            y[start:end] += (shrunk @ B[slot, :, :r].T) * scales[slot]


def lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    slot_of_token: torch.Tensor,
) -> torch.Tensor:
    """Out of place, the definition: a per-token gather of each token's A and B (slot -1: none)."""
    has = slot_of_token >= 0
    slot = slot_of_token.clamp(min=0)
    shrunk = torch.einsum("ti,tri->tr", x, A[slot])  # [tokens, max_rank]
    delta = torch.einsum("tr,tor->to", shrunk, B[slot]) * scales[slot][:, None]
    return y + delta * has[:, None]

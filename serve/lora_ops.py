"""The batched LoRA op: many adapters, mixed ranks, one batch, no weight merging.

Semantics, for every token i whose sequence has an adapter in slot s = slot_of_token[i]:
    y[i] += (x[i] @ A[s]ᵀ) @ B[s]
A: [slots, max_rank, in] is PEFT's lora_A; B: [slots, max_rank, out] is scale · lora_Bᵀ
(scale = alpha / r, or alpha / sqrt(r) with rsLoRA); both are zero beyond the adapter's rank.

Two implementations with one meaning, chosen per step by cost (`LoraBatch.build`):
- segments (SGMV): the scheduler orders the batch by slot, so each adapter's tokens are one
  contiguous run; two matmuls per run at the adapter's own rank. Best for prefill chunks.
- masked: one shrink against every used slot at once, a 0/1 mask keeping each token's own
  slot, one expand. Two matmuls whatever the number of adapters; best for decode steps, where
  per-run launches would dominate.
Neither loops over sequences. `lora_reference` (a per-token gather) is what tests compare
them with; GPU kernels replace both behind the same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Masked costs num_tokens * used_slots * max_rank multiply-adds per weight row; segments cost
# a fixed overhead per run. Measured on CPU, one run's overhead is worth about this many
# (token x slot x rank) units of masked work.
_RUN_COST = 2048


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


def slot_mask(
    segments: list[tuple[int, int, int]], num_tokens: int, used_slots: int, max_rank: int, device
) -> torch.Tensor:
    """[num_tokens, used_slots * max_rank]: 1 on the rank columns of each token's own slot."""
    mask = torch.zeros(num_tokens, used_slots, max_rank)
    for start, end, slot in segments:
        mask[start:end, slot] = 1.0
    return mask.reshape(num_tokens, used_slots * max_rank).to(device)


@dataclass
class LoraBatch:
    """How this step applies LoRA: the segments, and the mask when masked is cheaper."""

    segments: list[tuple[int, int, int]]  # (start, end, slot)
    mask: torch.Tensor | None  # [num_tokens, used_slots * max_rank], or None: use segments

    @classmethod
    def build(
        cls, slots: list[int], num_tokens: list[int], max_rank: int, device, dtype=torch.float32
    ) -> LoraBatch | None:
        segments = segments_of(slots, num_tokens)
        if not segments:
            return None
        used = max(s for _, _, s in segments) + 1
        total = sum(num_tokens)
        if total * used * max_rank <= _RUN_COST * len(segments):
            return cls(segments, slot_mask(segments, total, used, max_rank, device).to(dtype))
        return cls(segments, None)


def lora_segments(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    ranks: list[int],
    segments: list[tuple[int, int, int]],
) -> None:
    """In place, per segment: y[start:end] += (x[start:end] @ A[s, :r]ᵀ) @ B[s, :r], r = ranks[s];
    rank 0 means the slot's adapter does not target this module."""
    for start, end, slot in segments:
        r = ranks[slot]
        if r:
            y[start:end] += (x[start:end] @ A[slot, :r].T) @ B[slot, :r]


def lora_masked(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor
) -> None:
    """In place: y += ((x @ A[:k]ᵀ) ⊙ mask) @ B[:k], slots flattened, k = used slots."""
    used = mask.shape[1] // A.shape[1]
    shrunk = x @ A[:used].flatten(0, 1).T  # [tokens, used * max_rank]
    y += shrunk.mul_(mask) @ B[:used].flatten(0, 1)


def lora_reference(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slot_of_token: torch.Tensor
) -> torch.Tensor:
    """Out of place, the definition: a per-token gather of each token's A and B (slot -1: none)."""
    has = slot_of_token >= 0
    slot = slot_of_token.clamp(min=0)
    shrunk = torch.einsum("ti,tri->tr", x, A[slot])  # [tokens, max_rank]
    delta = torch.einsum("tr,tro->to", shrunk, B[slot])
    return y + delta * has[:, None]

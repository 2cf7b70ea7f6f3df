"""The batched LoRA op: many adapters, mixed ranks, one batch, no weight merging.

Semantics, for every token i whose sequence has an adapter in slot s = slot_of_token[i]:
    y[i] += (x[i] @ A[s]ᵀ) @ B[s]
A: [slots, max_rank, in] is PEFT's lora_A; B: [slots, max_rank, out] is scale · lora_Bᵀ
(scale = alpha / r, or alpha / sqrt(r) with rsLoRA); both are zero beyond the adapter's rank.

Two implementations with one meaning, chosen per step (`LoraBatch.build`):
- segments (SGMV): the scheduler orders the batch by slot, so each adapter's tokens are one
  contiguous run; two matmuls per run at the adapter's own rank. Used for one or two runs.
- gathered (BGMV): runs are cut into chunks of equal width, padded, and computed as two
  batched matmuls for all adapters at once, each chunk with its own slot's A and B. The
  padding costs at most as many rows as there are tokens; launches no longer grow with the
  number of adapters, which is what decode steps over many adapters need.
Neither loops over sequences. `lora_reference` (a per-token gather) is what tests compare
them with. On CUDA the Triton kernel `serve.kernels.lora_sgmv` replaces both; it reads the
segment table that `LoraBatch.build(..., kernel=True)` makes.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def chunk_rows(segments: list[tuple[int, int, int]]):
    """Cut segments into chunks of one width (about the mean segment length).

    Returns (tokens [chunks, width]: the token of each row, padding repeats the chunk's last
    token; slots [chunks]; rows [real rows]: flat row index of each real row; dest [real rows]:
    the token it belongs to). Pure, so it is tested on tables.
    """
    total = sum(end - start for start, end, _ in segments)
    width = -(-total // len(segments))
    chunks = [
        (a, min(a + width, end), slot)
        for start, end, slot in segments
        for a in range(start, end, width)
    ]
    tokens = torch.tensor([[min(a + j, b - 1) for j in range(width)] for a, b, _ in chunks])
    valid = torch.tensor([[a + j < b for j in range(width)] for a, b, _ in chunks])
    rows = valid.flatten().nonzero().squeeze(1)
    return tokens, torch.tensor([slot for _, _, slot in chunks]), rows, tokens.flatten()[rows]


@dataclass
class LoraBatch:
    """How this step applies LoRA: its segments, and the gathered chunks when there are
    enough runs for batching to pay."""

    segments: list[tuple[int, int, int]]  # (start, end, slot)
    chunk_tokens: torch.Tensor | None = None  # [chunks, width] token of each row
    chunk_slots: torch.Tensor | None = None  # [chunks] adapter slot of each chunk
    rows: torch.Tensor | None = None  # [real rows] flat index of the rows that are not padding
    dest: torch.Tensor | None = None  # [real rows] the token each real row adds to
    # For the kernel (serve.kernels.lora_sgmv): [segments, 3] int32 (start, end, slot) rows
    segment_table: torch.Tensor | None = None
    max_segment_len: int = 0  # tokens of the longest segment

    @classmethod
    def build(
        cls, slots: list[int], num_tokens: list[int], device, kernel: bool = False
    ) -> LoraBatch | None:
        """None when no token has an adapter: such a step pays nothing for LoRA. With
        `kernel`, the segment table the Triton kernel reads instead of gathered chunks."""
        segments = segments_of(slots, num_tokens)
        if not segments:
            return None
        if kernel:
            table = torch.tensor(segments, dtype=torch.int32, device=device)
            longest = max(end - start for start, end, _ in segments)
            return cls(segments, segment_table=table, max_segment_len=longest)
        if len(segments) <= 2:
            return cls(segments)
        tokens, chunk_slots, rows, dest = (t.to(device) for t in chunk_rows(segments))
        return cls(segments, tokens, chunk_slots, rows, dest)


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


def lora_gathered(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, batch: LoraBatch
) -> None:
    """In place: y[t] += (x[t] @ A[c]ᵀ) @ B[c] for each real row t of each chunk c's slot."""
    xs = x[batch.chunk_tokens]  # [chunks, width, in]
    a = A.index_select(0, batch.chunk_slots)  # [chunks, max_rank, in]
    b = B.index_select(0, batch.chunk_slots)  # [chunks, max_rank, out]
    out = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b)  # [chunks, width, out]
    y.index_add_(0, batch.dest, out.flatten(0, 1).index_select(0, batch.rows))


def lora_reference(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slot_of_token: torch.Tensor
) -> torch.Tensor:
    """Out of place, the definition: a per-token gather of each token's A and B (slot -1: none)."""
    has = slot_of_token >= 0
    slot = slot_of_token.clamp(min=0)
    shrunk = torch.einsum("ti,tri->tr", x, A[slot])  # [tokens, max_rank]
    delta = torch.einsum("tr,tro->to", shrunk, B[slot])
    return y + delta * has[:, None]

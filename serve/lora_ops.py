"""The batched LoRA op: many adapters, mixed ranks, one batch, no weight merging.

Semantics, for every token i whose sequence has an adapter in slot s = slot_of_token[i]:
    y[i] += (x[i] @ A[s]ᵀ) @ B[s]
A: [slots, max_rank, in] is PEFT's lora_A; B: [slots, max_rank, out] is scale · lora_Bᵀ
(scale = alpha / r, or alpha / sqrt(r) with rsLoRA); both are zero beyond the adapter's rank.

Two implementations with one meaning, chosen per step (`LoraBatch.build`):
- segments (SGMV): the scheduler orders the batch by slot, so each adapter's tokens are one
  contiguous run; two matmuls per run at the adapter's own rank. Used for one or two runs.
- gathered (BGMV): tokens are laid out as chunks of equal width, padded, and computed as two
  batched matmuls for all adapters at once, each chunk with its own slot's A and B. Launches
  no longer grow with the number of adapters, which is what decode steps over many adapters
  need. When one chunk per slot (each slot's tokens, padded to the busiest slot's count) costs
  at most twice the tokens' rows, chunk c is slot c and the slots' A and B are read in place,
  not copied per step (`slot_rows`); otherwise runs are cut into chunks of about the mean run
  length (`chunk_rows`), whose padding costs at most as many rows as there are tokens.
  Modules that read the same input (q, k, v; gate, up) share one shrink matmul against
  their A stacked along the rank (`lora_gathered_shared`).
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


def slot_rows(segments: list[tuple[int, int, int]]):
    """One chunk per slot 0..max slot: chunk s holds slot s's tokens, padded to the busiest
    slot's count; None when that padding would be more than the tokens themselves.

    Returns (tokens [slots, width]: the token of each row, padding repeats the slot's last
    token or, for a slot with no tokens, the first token of the batch; rows [real rows]: flat
    row index of each real row; dest [real rows]: the token it belongs to). Pure, so it is
    tested on tables.
    """
    of_slot: dict[int, list[int]] = {}
    for start, end, slot in segments:
        of_slot.setdefault(slot, []).extend(range(start, end))
    total = sum(len(t) for t in of_slot.values())
    slots, width = max(of_slot) + 1, max(len(t) for t in of_slot.values())
    if slots * width > 2 * total:
        return None
    first = segments[0][0]
    tokens, rows = [], []
    for s in range(slots):
        own = of_slot.get(s, [])
        rows += range(s * width, s * width + len(own))
        tokens.append(own + [own[-1] if own else first] * (width - len(own)))
    tokens = torch.tensor(tokens)
    rows = torch.tensor(rows, dtype=torch.long)
    return tokens, rows, tokens.flatten()[rows]


@dataclass
class LoraBatch:
    """How this step applies LoRA: its segments, and the gathered chunks when there are
    enough runs for batching to pay."""

    segments: list[tuple[int, int, int]]  # (start, end, slot)
    chunk_tokens: torch.Tensor | None = None  # [chunks, width] token of each row
    # [chunks] adapter slot of each chunk; None with chunk_tokens: chunk c is slot c
    chunk_slots: torch.Tensor | None = None
    # [num_tokens] flat row of the chunks' output that holds each token's delta
    source: torch.Tensor | None = None
    # [num_tokens, 1] True for tokens without an adapter (their source row is any row);
    # None when every token has one
    base_only: torch.Tensor | None = None
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
        by_slot = slot_rows(segments)
        if by_slot is not None:
            tokens, rows, dest = by_slot
            chunk_slots = None
        else:
            tokens, chunk_slots, rows, dest = chunk_rows(segments)
            chunk_slots = chunk_slots.to(device)
        # Each token with an adapter is one real row: adding the chunks' output back is a
        # gather (one index_select) rather than a scatter (index_add_ runs a loop over the
        # rows on CPU, 5x slower into the strided q/k/v views)
        total = sum(num_tokens)
        source = torch.zeros(total, dtype=torch.long)
        source[dest] = rows
        base_only = None
        if len(dest) < total:
            base_only = torch.ones(total, 1, dtype=torch.bool)
            base_only[dest] = False
            base_only = base_only.to(device)
        return cls(segments, tokens.to(device), chunk_slots, source.to(device), base_only)


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
    """In place: y[t] += (x[t] @ A[s]ᵀ) @ B[s] for each real row t of each chunk, s its slot."""
    lora_gathered_shared([y], x, A, [B], batch)


def _of_chunks(W: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
    """Each chunk's slot of W [slots, ...]: a view when chunk c is slot c, else a copy."""
    if batch.chunk_slots is None:
        return W[: batch.chunk_tokens.shape[0]]
    return W.index_select(0, batch.chunk_slots)


def lora_gathered_shared(
    ys: list[torch.Tensor],
    x: torch.Tensor,
    A: torch.Tensor,
    Bs: list[torch.Tensor],
    batch: LoraBatch,
) -> None:
    """In place, modules j = 0.. that read the same x, A = their A stacked along the rank
    ([slots, modules · max_rank, in]): y_j[t] += (x[t] @ A_j[s]ᵀ) @ B_j[s], s the slot of t.

    One shrink matmul for all the modules instead of one each."""
    rank = Bs[0].shape[1]
    # [chunks, width, in]; index_select copies whole rows, faster than x[chunk_tokens] on CPU
    xs = x.index_select(0, batch.chunk_tokens.flatten()).unflatten(0, batch.chunk_tokens.shape)
    shrunk = torch.bmm(xs, _of_chunks(A, batch).transpose(1, 2))  # [chunks, width, j · rank]
    for j, (y, B) in enumerate(zip(ys, Bs, strict=True)):
        part = shrunk[..., j * rank : (j + 1) * rank]
        out = torch.bmm(part, _of_chunks(B, batch))  # [chunks, width, out]
        delta = out.flatten(0, 1).index_select(0, batch.source)  # [tokens, out]
        if batch.base_only is not None:
            delta.masked_fill_(batch.base_only, 0)
        y.add_(delta)


def lora_reference(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slot_of_token: torch.Tensor
) -> torch.Tensor:
    """Out of place, the definition: a per-token gather of each token's A and B (slot -1: none)."""
    has = slot_of_token >= 0
    slot = slot_of_token.clamp(min=0)
    shrunk = torch.einsum("ti,tri->tr", x, A[slot])  # [tokens, max_rank]
    delta = torch.einsum("tr,tro->to", shrunk, B[slot])
    return y + delta * has[:, None]

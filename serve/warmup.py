"""Steps that compile the Triton kernels before the first request.

Triton compiles a kernel once per specialization (each tile size or split its wrapper picks from
a step's shape), seconds each, paid by the first step that asks for it: on a fresh server, by
its first requests, which stall with everyone batched with them. The engine runs these plans
at start instead, over the K/V pool's scratch block, so every specialization a served step can
ask for is compiled (or read from Triton's disk cache) before anything waits on it.

What the wrappers choose from, and so what the plans vary:
- the NF4 matmul: the step's token count, up to the 256 rows past which it dequantizes
  once (`serve.linear.DEQUANTIZE_ABOVE_ROWS`);
- decode attention: the key split, from the batch and the longest context;
- LoRA shrink and expand: the number of adapter segments and the longest segment.
The splits are powers of two and the tile thresholds fall at powers of two, so powers of two
and one past them reach every choice; `tests/kernel_variants.py` checks that these plans ask
for every specialization a denser sweep of steps asks for.
"""

from __future__ import annotations

from serve.linear import DEQUANTIZE_ABOVE_ROWS
from serve.sampling_params import SamplingParams
from serve.scheduler import BASE_SLOT, SchedulerOutput
from serve.sequence import Sequence, Status


def powers_of_two(n: int, *, and_one_past: bool = False) -> list[int]:
    """1, 2, 4, ... up to n, then n itself; with `and_one_past`, 3, 5, 9, ... too."""
    values = {1 << k for k in range(n.bit_length()) if 1 << k <= n}
    if and_one_past:
        values |= {v + 1 for v in values if v + 1 <= n}
    return sorted(values | {n})


def warmup_plans(
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int,
    max_loras: int,
    block_size: int,
    scratch_block: int,
) -> list[SchedulerOutput]:
    """Plans of steps the scheduler could make, covering every kernel specialization. Each
    sequence's blocks are all `scratch_block` (no sequence owns it), so the steps write K/V
    nowhere else; a plan's outputs mean nothing."""
    budget = max_num_batched_tokens
    shapes: list[tuple[list[int], list[int], int]] = []  # (new tokens, contexts, adapters)
    # the key split of decode attention, from the longest context
    for context in powers_of_two(max_model_len)[1:]:
        shapes.append(([1], [context], 0))
    # the matmul's row tiles and K split, from the token count: decodes, then one chunk
    for batch in powers_of_two(min(max_num_seqs, budget), and_one_past=True):
        shapes.append(([1] * batch, [2] * batch, 0))
    chunks = [n for n in powers_of_two(budget, and_one_past=True) if n > 1]
    chunks = [n for n in chunks if n <= DEQUANTIZE_ABOVE_ROWS + 1 and n <= max_model_len]
    for chunk in chunks:
        shapes.append(([chunk], [chunk], 0))
    # LoRA: decodes on their own adapters each plus one chunk on another, for segments x tiles
    for adapters in powers_of_two(min(max_num_seqs, max_loras, budget)):
        room = min(budget - (adapters - 1), max_model_len)
        # the longest segment: 16 rows or fewer take the small tile, past that tiles of 32
        longest = [n for n in powers_of_two(room, and_one_past=True) if n >= 16]
        for chunk in [1, *longest]:
            news = [1] * (adapters - 1) + [chunk]
            shapes.append((news, [2] * (adapters - 1) + [max(chunk, 2)], adapters))
    return [_plan(*shape, block_size, scratch_block) for shape in shapes]


def _plan(
    news: list[int], contexts: list[int], adapters: int, block_size: int, scratch_block: int
) -> SchedulerOutput:
    """Sequence i computes its last news[i] of contexts[i] tokens, on adapter slot i %
    adapters (none when adapters is 0), in the scheduler's order (grouped by slot)."""
    seqs = []
    for i, (new, context) in enumerate(zip(news, contexts, strict=True)):
        seq = Sequence(
            f"warmup-{i}",
            [0] * context,
            context - 1,
            SamplingParams(max_tokens=1),
            status=Status.RUNNING,
        )
        seq.num_computed_tokens = context - new
        seq.block_table = [scratch_block] * -(-context // block_size)
        seqs.append(seq)
    slots = [i % adapters if adapters else BASE_SLOT for i in range(len(seqs))]
    order = sorted(range(len(seqs)), key=lambda i: slots[i])
    return SchedulerOutput(
        seqs=[seqs[i] for i in order],
        num_new_tokens=[news[i] for i in order],
        lora_slots=[slots[i] for i in order],
    )

"""Host time of a decode step's bookkeeping against context length: schedule, the attention
metadata the kernels read, update.

    .venv/bin/python bench/host_step.py [--batch 64] [--block-size 16] [--steps 200]

No model: 64 sequences decode one token a step over a prefix-caching allocator, at contexts of
256, 1024 and 4096 tokens. Prints µs per step and the ratio to the shortest context: a step's
bookkeeping should grow little with what the sequences already hold (on a GPU an 8B decode
step is ~10 ms, so every 0.1 ms here is 1 % of throughput).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.attention import build_attention_metadata
from serve.block_allocator import BlockAllocator
from serve.lora_slots import LoraSlots
from serve.sampling_params import SamplingParams
from serve.scheduler import Scheduler
from serve.sequence import Sequence

CONTEXTS = (256, 1024, 4096)


def step_us(batch: int, context: int, block_size: int, steps: int) -> float:
    """Median µs of a step's bookkeeping once `batch` sequences hold `context` tokens each."""
    blocks = batch * (context + steps + block_size) // block_size + 1
    scheduler = Scheduler(BlockAllocator(blocks, block_size), LoraSlots(8), batch, 1 << 20)
    params = SamplingParams(max_tokens=10 * steps, ignore_eos=True)
    for i in range(batch):
        prompt = [(i * 7919 + j) % 32000 for j in range(context)]
        scheduler.add(Sequence(f"r{i}", prompt, context, params, adapter_uid=f"a{i % 8}"))
    times = []
    for k in range(steps + 1):  # the first step prefills every prompt
        t0 = time.perf_counter()
        plan = scheduler.schedule()
        build_attention_metadata(
            [q.block_table for q in plan.seqs],
            [q.num_computed_tokens for q in plan.seqs],
            plan.num_new_tokens,
            block_size,
            "cpu",
            padded_groups=False,  # what the Triton kernels read
        )
        scheduler.update(plan, [k % 32000] * len(plan.seqs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    step_us(args.batch, CONTEXTS[0], args.block_size, args.steps)  # warm-up, not reported
    results = {c: step_us(args.batch, c, args.block_size, args.steps) for c in CONTEXTS}
    base = results[CONTEXTS[0]]
    for context, us in results.items():
        print(
            f"batch {args.batch}, context {context:5d}: {us:7.1f} µs/step "
            f"({us / base:.2f}x the {CONTEXTS[0]}-token step)"
        )


if __name__ == "__main__":
    main()

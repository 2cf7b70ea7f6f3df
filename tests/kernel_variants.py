"""How many compiles each Triton kernel costs a server, and whether the engine's start-up
warm-up (`serve.warmup`) asks for all of them.

    python tests/kernel_variants.py      # one JSON object: {"compiles": {kernel: count},
                                         #   "warmup_steps": n, "missing": [what it misses]}

Triton compiles a kernel once per combination of its compile-time arguments, launch options
and what it specializes the other integer arguments on (== 1, divisible by 16) and pointers on
(16-byte aligned); each compile takes seconds, paid by the first step that asks (a GPU's disk
cache keeps them for the next start). The sweep (`sweep`): the steps a Llama-3-8B server with
64 sequences, a 2,048-token budget, 8,192-token contexts and 64 adapter slots plans (decodes of
1-64 sequences at contexts to 8,192, prefill chunks of 2-2,048 tokens, decodes beside a chunk,
over no adapter or one adapter per sequence), on a GPU of 132 SMs. Each step makes a layer's
launches as the model does (stacked q/k/v and gate/up, one shared LoRA shrink for each), with
the kernels swapped for recorders of their specializations, so nothing runs; run in its own
process, without TRITON_INTERPRET (interpreted kernels keep no signature).
"""

from __future__ import annotations

import functools
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMS = 132  # an H100 SXM
MAX_SEQS, BUDGET, MAX_LEN, MAX_LORAS, RANK, BLOCK = 64, 2048, 8192, 64, 16, 16
HIDDEN, INTERMEDIATE, KV_HEADS, HEADS, HEAD_DIM = 4096, 14336, 8, 32, 128
BF16 = torch.bfloat16
# (modules reading one input, their output widths, the input width): the model's projections
PROJECTIONS = [
    (("q", "k", "v"), (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM), HIDDEN),
    (("o",), (HIDDEN,), HEADS * HEAD_DIM),
    (("gate", "up"), (INTERMEDIATE, INTERMEDIATE), HIDDEN),
    (("down",), (HIDDEN,), INTERMEDIATE),
]


def specialization(kernel, args, kwargs) -> tuple:
    """What Triton compiles this launch for: one compile per distinct value."""
    values = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
    free = set(kernel.do_not_specialize or ())
    key = [(k, kwargs[k]) for k in ("num_warps", "num_stages") if k in kwargs]
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            key.append((param.name, value))
        elif isinstance(value, torch.Tensor):
            key.append((param.name, value.data_ptr() % 16 == 0))
        elif isinstance(value, int) and not {param.name, param.num} & free:
            key.append((param.name, value == 1, value % 16 == 0))
    return kernel.__name__, tuple(key)


class Specializations:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records what it would compile
    (not the arguments: the sweep's K/V caches would pile up)."""

    def __init__(self, kernel, seen: set):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.seen.add(specialization(self.kernel, args, kwargs))


@functools.cache
def weights(fan_in: int, fan_outs: tuple[int, ...]):
    """A projection's packed 4-bit weight and its adapters' stacked A and per-module B."""
    out = sum(fan_outs)
    packed, absmax = torch.empty(fan_in * out // 2, dtype=torch.uint8), torch.zeros(1)
    A = torch.zeros(MAX_LORAS, len(fan_outs) * RANK, fan_in, dtype=BF16)
    Bs = [torch.zeros(MAX_LORAS, RANK, n, dtype=BF16) for n in fan_outs]
    ranks = torch.full((len(fan_outs), MAX_LORAS), RANK, dtype=torch.int32)
    return packed, absmax, A, Bs, ranks


@functools.cache
def kv_cache():
    return torch.empty(MAX_SEQS * MAX_LEN, KV_HEADS, HEAD_DIM, dtype=BF16)


def step(new: list[int], computed: list[int], slots: list[int]) -> None:
    """One layer's launches for a step: sequence i computes new[i] tokens after computed[i],
    on adapter slot slots[i] (-1: none)."""
    from serve.attention import build_attention_metadata
    from serve.kernels import lora_sgmv, nf4_matmul, paged_attention
    from serve.linear import DEQUANTIZE_ABOVE_ROWS
    from serve.lora_ops import LoraBatch

    tokens = sum(new)
    lora = LoraBatch.build(slots, new, "cpu", kernel=True)
    for _, fan_outs, fan_in in PROJECTIONS:
        packed, absmax, A, Bs, ranks = weights(fan_in, fan_outs)
        x = torch.empty(tokens, fan_in, dtype=BF16)
        if tokens > DEQUANTIZE_ABOVE_ROWS:
            nf4_matmul.nf4_dequantize(packed, absmax, torch.zeros(16), sum(fan_outs), BF16)
        else:
            nf4_matmul.nf4_matmul(x, packed, absmax, torch.zeros(16), sum(fan_outs))
        if lora is not None:
            ys = [torch.empty(tokens, n, dtype=BF16) for n in fan_outs]
            segments, longest = lora.segment_table, lora.max_segment_len
            lora_sgmv.lora_sgmv_shared(ys, x, A, Bs, segments, longest, ranks)
    tables = [[0] * -(-(c + n) // BLOCK) for c, n in zip(computed, new, strict=True)]
    meta = build_attention_metadata(tables, computed, new, BLOCK, "cpu", padded_groups=False)
    q = torch.empty(tokens, HEADS, HEAD_DIM, dtype=BF16)
    k = torch.empty(tokens, KV_HEADS, HEAD_DIM, dtype=BF16)
    splits = None
    if meta.max_query_len == 1:  # as on a GPU: the wrapper sees CPU tensors here
        splits = paged_attention.decode_splits(len(new) * KV_HEADS, meta.max_context_len, 64, SMS)
    cache = kv_cache()
    paged_attention.paged_attention_triton(q, k, k, cache, cache, meta, 0.1, splits=splits)


def sweep():
    """(new, computed, slots) of the steps a server plans: every batch and every matmul row
    count, contexts and chunks at and around each power of two and between."""
    contexts = sorted({2, 17, 100, 255, 256, 257, 511, 512, 1000, 1024, 2048, 4000, MAX_LEN})
    for batch in range(1, MAX_SEQS + 1):
        for context in contexts:
            yield [1] * batch, [context - 1] * batch, [-1] * batch
        yield [1] * batch, [9] * batch, list(range(batch))
    for chunk in [*range(2, 300), *range(300, BUDGET, 7), BUDGET]:
        yield [chunk], [0], [-1]
        yield [chunk], [0], [0]
    # beside the decodes, one per adapter, a chunk on its own: segments x longest segment
    chunks = [2, 15, 16, 17, 31, 32, 33, *range(40, BUDGET, 37)]
    for decodes in range(1, MAX_SEQS):
        for chunk in [c for c in chunks if decodes + c <= BUDGET]:
            yield [1] * decodes + [chunk], [9] * decodes + [0], list(range(decodes + 1))


def record(steps) -> set:
    from serve.kernels import lora_sgmv, nf4_matmul, paged_attention

    seen: set = set()
    for module in (nf4_matmul, lora_sgmv, paged_attention):
        for name in dir(module):
            kernel = getattr(module, name)
            if isinstance(kernel, Specializations):  # recorded before
                kernel = kernel.kernel
            if name.endswith("_kernel"):
                setattr(module, name, Specializations(kernel, seen))
    for new, computed, slots in steps:
        step(new, computed, slots)
    return seen


def main() -> None:
    from serve.warmup import warmup_plans

    served = record(sweep())
    plans = warmup_plans(MAX_SEQS, BUDGET, MAX_LEN, MAX_LORAS, BLOCK, scratch_block=0)
    warmed = record(
        (p.num_new_tokens, [s.num_computed_tokens for s in p.seqs], p.lora_slots) for p in plans
    )
    report = {
        "compiles": dict(Counter(name for name, _ in served)),
        "warmup_steps": len(plans),
        "missing": sorted(map(str, served - warmed)),
        "extra": sorted(map(str, warmed - served)),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()

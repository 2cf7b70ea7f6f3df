"""How many compiles each Triton kernel costs a server: the distinct specializations its
launches ask for over the step shapes a Llama-3-8B engine plans.

    python tests/kernel_variants.py      # one JSON object: kernel -> compiles

Triton compiles a kernel once per combination of its compile-time arguments, launch options
and what it specializes the other integer arguments on (== 1, divisible by 16) and pointers on
(16-byte aligned); each compile takes seconds, paid by the first step that asks (a GPU's disk
cache keeps them for the next start). The sweep: decode steps of 1 to 64 sequences at contexts
of 17 to 8,192 tokens, prefill chunks of 2 to 2,048 tokens, over 1, 8 or 64 adapter slots, on
a GPU of 132 SMs. Kernels are swapped for recorders of their specializations, so nothing runs; run
in its own process, without TRITON_INTERPRET (interpreted kernels keep no signature).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMS = 132  # an H100 SXM
MAX_LORAS = 64  # adapter slots in the pool
HIDDEN, KV_HEADS, HEADS, HEAD_DIM = 4096, 8, 32, 128
PROJECTIONS = {
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
DECODE = [(b, c) for b in (1, 2, 3, 5, 8, 13, 24, 32, 47, 64) for c in (17, 100, 512, 2048, 8192)]
PREFILL = [(b, n) for b in (1, 3) for n in (2, 15, 16, 100, 256, 300, 2048)]


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


def step(batch: int, new: int, context: int, slots: int) -> None:
    """One step's launches: every base projection, one LoRA module, attention."""
    from serve.attention import build_attention_metadata
    from serve.kernels import lora_sgmv, nf4_matmul, paged_attention
    from serve.lora_ops import LoraBatch

    bf16, tokens = torch.bfloat16, batch * new
    for fan_in, fan_out in PROJECTIONS.values():
        packed, absmax = torch.empty(fan_in * fan_out // 2, dtype=torch.uint8), torch.zeros(1)
        if tokens <= 256:  # past that the engine dequantizes once and calls cuBLAS
            x = torch.zeros(tokens, fan_in, dtype=bf16)
            nf4_matmul.nf4_matmul(x, packed, absmax, torch.zeros(16), fan_out)
    lora_slots = sorted(i % slots for i in range(batch))
    lora = LoraBatch.build(lora_slots, [new] * batch, "cpu", kernel=True)
    # the engine's pool: MAX_LORAS slots, `slots` of them used by the step
    A = torch.zeros(MAX_LORAS, 16, HIDDEN, dtype=bf16)
    B = torch.zeros(MAX_LORAS, 16, HIDDEN, dtype=bf16)
    y, x = torch.zeros(tokens, HIDDEN, dtype=bf16), torch.zeros(tokens, HIDDEN, dtype=bf16)
    ranks = torch.full((MAX_LORAS,), 16, dtype=torch.int32)
    lora_sgmv.lora_sgmv(y, x, A, B, lora.segment_table, lora.max_segment_len, ranks)
    width = -(-context // 16)
    tables = [list(range(i * width, (i + 1) * width)) for i in range(batch)]
    meta = build_attention_metadata(
        tables, [context - new] * batch, [new] * batch, 16, "cpu", padded_groups=False
    )
    cache = torch.empty(batch * width * 16, KV_HEADS, HEAD_DIM, dtype=bf16)
    q = torch.zeros(tokens, HEADS, HEAD_DIM, dtype=bf16)
    k = torch.zeros(tokens, KV_HEADS, HEAD_DIM, dtype=bf16)
    splits = None
    if new == 1:  # as on a GPU: the wrappers see CPU tensors here
        splits = paged_attention.decode_splits(batch * KV_HEADS, meta.max_context_len, 64, SMS)
    paged_attention.paged_attention_triton(q, k, k, cache, cache, meta, 0.1, splits=splits)


def compiles() -> dict[str, int]:
    from serve.kernels import lora_sgmv, nf4_matmul, paged_attention

    seen: set = set()
    for module in (nf4_matmul, lora_sgmv, paged_attention):
        for name in dir(module):
            if name.endswith("_kernel"):
                setattr(module, name, Specializations(getattr(module, name), seen))
    for slots in (1, 8, 64):
        for batch, context in DECODE:
            step(batch, 1, context, min(slots, batch))
        for batch, new in PREFILL:
            step(batch, new, new + 40, min(slots, batch))
    return dict(Counter(name for name, _ in seen))


if __name__ == "__main__":
    print(json.dumps(compiles()))

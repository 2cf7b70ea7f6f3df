"""Host tier to slot: how long one adapter takes to copy in, against the per-tensor way.

    python bench/adapter_load.py [--shape llama3-8b|smollm2-135m] [--rank 16] [--device cpu|cuda]

A rank-`rank` adapter on all seven modules of every layer, random. The baseline is what the
pool did before it kept adapters in the slot layout: per (layer, module), scale and
transpose B on the host and copy A and B into the slot, 2 x layers x 7 copies (448 at 8B).
`AdapterPool.load_slot` copies each module's A and B whole (14 copies) from the host tier,
which holds them already scaled, in the slots' dtype (page-locked when slots are on a GPU).
Both run in this process, alternating; the ratio is the median of each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.adapter_pool import AdapterPool
from serve.llama import LORA_MODULES, ModelShape
from serve.lora_weights import slot_layout

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3),
}  # fmt: skip


def per_tensor_load(pool: AdapterPool, slot: int, tensors: dict) -> None:
    """The baseline: one copy per (layer, module) and matrix, B scaled on the host."""
    for m in LORA_MODULES:
        pool.A[m][:, slot].zero_()
        pool.B[m][:, slot].zero_()
    for (layer, m), (a, b, scale) in tensors.items():
        r = a.shape[0]
        pool.A[m][layer, slot, :r].copy_(a)
        pool.B[m][layer, slot, :r].copy_(b.T * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from transformers import LlamaConfig

    shape = ModelShape.from_config(LlamaConfig(**SHAPES[args.shape]))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pool = AdapterPool(shape, 2, args.rank, 2, dtype, device)
    gen = torch.Generator().manual_seed(0)
    tensors = {}  # (layer, module) -> (A [r, in], B [out, r], scale), as read from PEFT
    for layer in range(shape.num_layers):
        for m in LORA_MODULES:
            fan_in, fan_out = shape.lora_dims(m)
            a = torch.randn(args.rank, fan_in, generator=gen)
            tensors[(layer, m)] = (a, torch.randn(fan_out, args.rank, generator=gen), 2.0)
    weights = slot_layout("bench#1", Path("."), tensors, shape, dtype, device.type == "cuda")
    pool.keep(weights)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    baseline, whole = [], []
    for _ in range(args.repeats + 1):  # the first of each warms up
        baseline.append(timed(lambda: per_tensor_load(pool, 0, tensors)))
        whole.append(timed(lambda: pool.load_slot(1, "bench#1")))
    for m in LORA_MODULES:  # both ways fill a slot alike
        torch.testing.assert_close(pool.A[m][:, 0], pool.A[m][:, 1])
        torch.testing.assert_close(pool.B[m][:, 0], pool.B[m][:, 1])
    t_base, t_new = statistics.median(baseline[1:]), statistics.median(whole[1:])
    nbytes = sum(w.nbytes for w in (*weights.A.values(), *weights.B.values()))
    print(
        f"adapter load ({args.shape}, rank {args.rank}, {nbytes / 1e6:.0f} MB in {dtype}, "
        f"{device.type}): per-tensor {t_base * 1e3:.1f} ms, slot layout {t_new * 1e3:.1f} ms: "
        f"{t_base / t_new:.2f}x"
    )


if __name__ == "__main__":
    main()

"""The base linears of one decode step on the CPU: torch's default fp32 path (MKL) against the
oneDNN op `serve.linear.linear` uses, in one process.

    .venv/bin/python bench/cpu_linear.py [--rows 1 8 32 64 256] [--threads N]

Every layer's fused projections (q/k/v, o, gate/up, down) of SmolLM2-135M plus the tied
lm_head, with random weights of those shapes; best of 7 for each side, then the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_ms(fn, repeats: int = 7) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 256])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig

    from registry.base_model import resolve_base_model
    from registry.home import setup_environment
    from serve.linear import linear
    from serve.llama import ModelShape

    if args.threads:
        torch.set_num_threads(args.threads)
    base = resolve_base_model("smollm2-135m-instruct", setup_environment())
    s = ModelShape.from_config(AutoConfig.from_pretrained(base.path))
    qkv = s.num_heads * s.head_dim + 2 * s.num_kv_heads * s.head_dim
    shapes = [  # (out, in) of the fused projections of one layer
        (qkv, s.hidden_size),
        (s.hidden_size, s.num_heads * s.head_dim),
        (2 * s.intermediate_size, s.hidden_size),
        (s.hidden_size, s.intermediate_size),
    ]
    weights = [torch.randn(o, i) for o, i in shapes]
    lm_head = torch.randn(s.vocab_size, s.hidden_size)
    print(f"{s.num_layers} layers + lm_head, fp32, {torch.get_num_threads()} threads")
    print("rows   torch F.linear ms   oneDNN linear ms   ratio")
    for rows in args.rows:
        inputs = [torch.randn(rows, w.shape[1]) for w in weights]
        head_in = torch.randn(rows, s.hidden_size)

        def step(op, inputs=inputs, head_in=head_in):
            for _ in range(s.num_layers):
                for x, w in zip(inputs, weights, strict=True):
                    op(x, w)
            op(head_in, lm_head)

        stock, ours = best_ms(lambda: step(F.linear)), best_ms(lambda: step(linear))
        print(f"{rows:4d}   {stock:17.1f}   {ours:16.1f}   {stock / ours:5.2f}x")


if __name__ == "__main__":
    main()

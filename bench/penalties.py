"""Frequency, presence and repetition penalties over a batch: one scatter against row by row,
with the tokens read from the sequences' lists and from the sampler's `TokenHistory`.

    .venv/bin/python bench/penalties.py [--rows 64] [--vocab 49152] [--threads N]

Every row penalized (as a chat client sending frequency_penalty and presence_penalty, plus
repetition_penalty), random logits (the cost does not depend on their values), sequences of
256 prompt + 64 output tokens and 1024 + 512. The baseline is the row-by-row definition
(`apply_penalties_reference`, what the sampler ran before): several small ops per row, each a
kernel launch on a GPU; here the CPU's per-op overhead stands in for that. The history keeps
each request's tokens as an array across steps, as the sampler does: a step copies only its
new tokens, where reading the lists costs O(tokens) of Python on the host every step.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.timing import median_time
from serve.sampler import TokenHistory, apply_penalties, apply_penalties_reference
from serve.sampling_params import SamplingParams
from serve.sequence import Sequence

LENGTHS = ((256, 64), (1024, 512))  # prompt, output tokens
PARAMS = SamplingParams(frequency_penalty=0.3, presence_penalty=0.2, repetition_penalty=1.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, generator=g)
    for prompt, output in LENGTHS:
        seqs = [
            Sequence(
                f"r{i}",
                torch.randint(args.vocab, (prompt + output,), generator=g).tolist(),
                prompt,
                PARAMS,
            )
            for i in range(args.rows)
        ]
        before = median_time(partial(apply_penalties_reference, logits, seqs), repeats=20) * 1e3
        lists = median_time(partial(apply_penalties, logits, seqs), repeats=20) * 1e3
        history = partial(apply_penalties, logits, seqs, TokenHistory())
        now = median_time(history, repeats=20) * 1e3  # its first call copied the tokens
        print(
            f"{args.rows} rows, {prompt} + {output} tokens: row by row {before:6.2f} ms, "
            f"batched from lists {lists:6.2f} ms ({before / lists:.2f}x), from the history "
            f"{now:6.2f} ms ({before / now:.2f}x; {lists / now:.2f}x the lists)"
        )


if __name__ == "__main__":
    main()

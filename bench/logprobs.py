"""Log-probabilities of chosen tokens with their top alternatives: per row against one batch.

    .venv/bin/python bench/logprobs.py [--vocab 49152] [--threads N]

What a step reports for 64 decoding requests that ask `logprobs` and for a 1024-token prompt
scored with `echo` (lm-eval-harness): the baseline is the earlier per-row definition (a top-k
and three copies to the host per row, each a wait on a GPU); now one gather, one top-k and
three copies for all rows (`serve.sampler.token_logprobs`). Random log-probabilities: the
cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.timing import median_time
from serve.sampler import TokenLogprobs, token_logprobs

CASES = {"64 decodes, top 5": (64, 5), "1024 prompt tokens, top 1": (1024, 1)}


def per_row(logprobs: torch.Tensor, tokens: list[int], n: int) -> list[TokenLogprobs]:
    """The earlier definition: each row alone."""
    out = []
    for row, token in zip(logprobs, tokens, strict=True):
        values, ids = row.topk(n)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
        out.append(TokenLogprobs(token, float(row[token]), top))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    for name, (rows, n) in CASES.items():
        logprobs = torch.randn(rows, args.vocab, generator=g).log_softmax(-1)
        tokens = torch.randint(args.vocab, (rows,), generator=g).tolist()
        before = median_time(partial(per_row, logprobs, tokens, n), repeats=20) * 1e3
        now = median_time(partial(token_logprobs, logprobs, tokens, [n] * rows), repeats=20) * 1e3
        print(f"{name}: per row {before:7.2f} ms, batched {now:7.2f} ms: {before / now:.2f}x")


if __name__ == "__main__":
    main()

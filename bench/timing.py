"""Timing for the benchmarks: the median over repeats after a warm-up, synchronized on CUDA."""

from __future__ import annotations

import os
import statistics
import time


def median_time(fn, device="cpu", repeats: int | None = None) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one call to warm up. By default
    10, or 1 through Triton's interpreter: a smoke test, whose timings mean nothing and whose
    interpreted kernels take a fraction of a second a call."""
    if repeats is None:
        repeats = 1 if os.environ.get("TRITON_INTERPRET") == "1" else 10
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()

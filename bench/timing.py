"""Timing for the benchmarks: the median over repeats after a warm-up, synchronized on CUDA."""

from __future__ import annotations

import statistics
import time


def median_time(fn, device="cpu", repeats: int = 10) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one call to warm up."""
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

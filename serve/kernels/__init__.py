"""Triton kernels for CUDA, each behind the plain-torch reference op it replaces.

- `paged_attention.paged_attention_triton` replaces `serve.attention.paged_attention`;
- `lora_sgmv.lora_sgmv` replaces `serve.lora_ops.lora_segments` / `lora_gathered`;
- `nf4_matmul.nf4_matmul` replaces bitsandbytes' `matmul_4bit` (`serve.linear.PackedLinear4bit`).

The engine picks them with `use_triton(device, mode)` once, at construction. This package
imports no triton itself: on CPU, serving never imports it; the tests run the kernels on CPU
through Triton's interpreter (`TRITON_INTERPRET=1`, set before a kernel module is imported).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections import Counter

import torch

from registry.errors import UsageError

MODES = ("auto", "triton", "reference")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(device, mode: str = "auto") -> bool:
    """Whether the engine runs the Triton kernels: on a CUDA device with triton importable
    ("auto"), never ("reference"), or always ("triton", an error where it cannot)."""
    if mode not in MODES:
        raise UsageError(f"kernels: {mode!r} is not one of {', '.join(MODES)}")
    possible = torch.device(device).type == "cuda" and triton_available()
    if mode == "triton" and not possible:
        raise UsageError("kernels: 'triton' needs a CUDA device and the triton package")
    return possible and mode != "reference"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee"), as the reference does, not TF32; the
    setting is ignored for 16-bit inputs, which use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def power_of_2_at_most(n: int) -> int:
    """The largest power of two <= n (1 for n < 1). Kernel splits are rounded to it: each
    value of a compile-time split is a compile of its own (seconds, on a server's first
    steps), and a power of two leaves at most six of 1..32."""
    return 1 << (max(1, n).bit_length() - 1)


@contextlib.contextmanager
def kernel_compiles():
    """Counter of the Triton kernels this process compiles (misses its in-memory cache: a
    compile, or a read from Triton's disk cache) while the block runs. Empty where nothing
    compiles: without triton, or interpreted."""
    compiled: Counter[str] = Counter()
    try:
        from triton import knobs
    except ImportError:
        yield compiled
        return
    previous = knobs.runtime.jit_post_compile_hook

    def hook(*, fn, **info):
        compiled[fn.name] += 1
        return previous(fn=fn, **info) if previous else None

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield compiled
    finally:
        knobs.runtime.jit_post_compile_hook = previous

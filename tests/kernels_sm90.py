"""Compile every Triton kernel, as the engine launches it, for Hopper (sm_90), without a GPU.

    python tests/kernels_sm90.py [DTYPE ...]   # a JSON line per launch: shared memory, MMA
                                               # (DTYPE: bfloat16, the default; float16, float32)

Triton's compiler and ptxas ship in its wheel, so the real GPU toolchain checks what the
interpreter lets through (dot shapes and dtypes, pointer arithmetic, layouts) and reports
each launch's shared memory, which must fit an H100's 227 KiB per block. The wrappers run
on CPU tensors of Llama-3-8B shapes with each kernel swapped for a recorder, so the block
sizes checked are the ones the wrappers choose. Run in its own process: a process that has
set TRITON_INTERPRET holds interpreted kernels, which cannot be compiled.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
}


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def compile_sm90(kernel, args, kwargs) -> dict:
    """Compile one recorded launch for sm_90: its shared memory and the MMA it uses."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i64" if abs(value) >= 2**31 else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    return {
        "kernel": kernel.__name__,
        "constexprs": {k: v for k, v in constexprs.items() if k != "PRECISION"},
        "options": options,
        "shared_bytes": compiled.metadata.shared,
        "mma": "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none",
        **registers(ptx),
    }


def registers(ptx: str) -> dict:
    """Registers per thread and bytes spilled to local memory, from `ptxas -v` (the ptxas
    Triton itself assembles with)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        report = subprocess.run(
            [get_ptxas(90).path, "-arch=sm_90a", "-v", str(source), "-o", str(source) + ".o"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    return {
        "registers": int(re.search(r"Used (\d+) registers", report)[1]),
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report)[1]),
    }


def launches(dtype: torch.dtype) -> list:
    """Each kernel's launches at Llama-3-8B shapes in `dtype`: decode and prefill."""
    from serve.attention import build_attention_metadata
    from serve.kernels import lora_sgmv, nf4_matmul, paged_attention
    from serve.lora_ops import LoraBatch

    recorded: list = []
    for module, names in (
        (nf4_matmul, ("_nf4_matmul_kernel", "_dequantize_kernel")),
        (lora_sgmv, ("_shrink_kernel", "_expand_kernel")),
        (paged_attention, ("_paged_attention_kernel", "_combine_kernel")),
    ):
        for name in names:
            kernel = getattr(module, name)
            kernel = kernel.kernel if isinstance(kernel, Recorder) else kernel
            setattr(module, name, Recorder(kernel, recorded))

    bf16 = dtype
    hidden, qkv, kv_heads, head_dim = 4096, 6144, 8, 128
    packed = torch.zeros(qkv * hidden // 2, dtype=torch.uint8)
    absmax, code = torch.zeros(qkv * hidden // 64), torch.zeros(16)
    for rows in (1, 16, 64, 256):  # the fused matmul's batch sizes
        nf4_matmul.nf4_matmul(torch.zeros(rows, hidden, dtype=bf16), packed, absmax, code, qkv)
    nf4_matmul.nf4_dequantize(packed, absmax, code, qkv, bf16)

    for seqs, new in ((64, 1), (1, 512)):  # a decode batch; one prefill chunk
        tokens = seqs * new
        batch = LoraBatch.build(list(range(seqs)), [new] * seqs, "cpu", kernel=True)
        x = torch.zeros(tokens, hidden, dtype=bf16)
        for rank in (16, 64):  # the benchmark's rank; QLoRA's (a rank past the tiles)
            ranks = torch.full((seqs,), rank, dtype=torch.int32)
            A = torch.zeros(seqs, rank, hidden, dtype=bf16)
            B = torch.zeros(seqs, rank, qkv, dtype=bf16)
            y = torch.zeros(tokens, qkv, dtype=bf16)
            lora_sgmv.lora_sgmv(y, x, A, B, batch.segment_table, batch.max_segment_len, ranks)
            # q/k/v: one shrink over their A stacked along the rank
            stacked = torch.zeros(seqs, 3 * rank, hidden, dtype=bf16)
            ys = list(y.split((4096, 1024, 1024), dim=1))
            Bs = [torch.zeros(seqs, rank, w.shape[1], dtype=bf16) for w in ys]
            table = torch.full((3, seqs), rank, dtype=torch.int32)
            lora_sgmv.lora_sgmv_shared(
                ys, x, stacked, Bs, batch.segment_table, batch.max_segment_len, table
            )

        tables = [list(range(i * 40, (i + 1) * 40)) for i in range(seqs)]
        meta = build_attention_metadata(
            tables, [600 - new] * seqs, [new] * seqs, 16, "cpu", padded_groups=False
        )
        cache = torch.zeros(seqs * 40 * 16, kv_heads, head_dim, dtype=bf16)
        q = torch.zeros(tokens, 32, head_dim, dtype=bf16)
        k = torch.zeros(tokens, kv_heads, head_dim, dtype=bf16)
        paged_attention.paged_attention_triton(q, k, k.clone(), cache, cache.clone(), meta, 0.1)
        if seqs > 1:  # a lone sequence's decode: its keys split over programs, then merged
            one = build_attention_metadata(tables[:1], [599], [1], 16, "cpu", padded_groups=False)
            paged_attention.paged_attention_triton(
                q[:1], k[:1], k[:1].clone(), cache, cache.clone(), one, 0.1, splits=16
            )
    return recorded


def main(dtypes: list[str]) -> None:
    for name in dtypes or ["bfloat16"]:
        for kernel, args, kwargs in launches(getattr(torch, name)):
            launch = compile_sm90(kernel, args, dict(kwargs))
            print(json.dumps({"dtype": name} | launch), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The GPU benchmark's kernel sections: each Triton kernel alone against the op it replaces.

- kernels: paged attention (a decode batch, a prefill chunk) and LoRA over distinct adapters,
           on the model's shapes, with the bandwidth each reaches;
- matmul:  one layer's seven base projections: bitsandbytes' NF4 against the Triton NF4
           kernel (q/k/v and gate/up stacked, as the engine runs them) and bf16, per batch;
- tune:    the NF4 kernel's, attention's and LoRA's block sizes, splits and warps swept.
None needs a model on disk. Also the timing helpers the engine sections share.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

from bench.gpu_model import SHAPES
from bench.timing import median_time, sync
from serve.llama import FUSED_GROUPS, LORA_MODULES, ModelShape


def section_kernels(cfg, args, results) -> None:
    import torch
    from transformers import LlamaConfig

    from serve.attention import paged_attention
    from serve.kernels.lora_sgmv import lora_sgmv
    from serve.kernels.paged_attention import paged_attention_triton
    from serve.lora_ops import LoraBatch, lora_gathered

    s = ModelShape.from_config(LlamaConfig(**SHAPES[cfg["shape"]]))
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch = cfg["decode"][0]
    rows = {}

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dtype)

    # attention: `batch` decodes after `context` tokens each; one prefill chunk after as many
    for label, seqs, computed, new in _attention_steps(cfg, args):
        tensors, reference, compact = _attention_case(s, device, dtype, seqs, computed, new)
        scale = s.head_dim**-0.5
        ref = partial(paged_attention, *tensors, reference, scale)
        kernel = partial(paged_attention_triton, *tensors, compact, scale)
        rows[f"attention_{label}"] = _kernel_row(
            f"attention {label} ({seqs} x {new} new after {computed})",
            _relative_error(kernel(), ref()),
            median_time(ref, device),
            median_time(kernel, device),
            tensors[3].nbytes + tensors[4].nbytes,
        )

    # LoRA: `batch` decode tokens, each of its own adapter (slot), at full rank
    rank = cfg["rank"]
    ranks = torch.full((batch,), rank, dtype=torch.int32, device=device)
    gathered = LoraBatch.build(list(range(batch)), [1] * batch, device)
    segments = LoraBatch.build(list(range(batch)), [1] * batch, device, kernel=True)
    table = (segments.segment_table, segments.max_segment_len)
    for module in ("q_proj", "gate_proj", "down_proj"):
        fan_in, fan_out = s.lora_dims(module)
        A, B = randn(batch, rank, fan_in) * 0.05, randn(batch, rank, fan_out) * 0.05
        x, y = randn(batch, fan_in), randn(batch, fan_out)
        y_ref, y_kernel = y.clone(), y.clone()
        lora_gathered(y_ref, x, A, B, gathered)
        lora_sgmv(y_kernel, x, A, B, *table, ranks)
        rows[f"lora_{module}"] = _kernel_row(
            f"lora {module} ({batch} tokens, {batch} adapters)",
            _relative_error(y_kernel, y_ref),
            median_time(partial(lora_gathered, y, x, A, B, gathered), device),
            median_time(partial(lora_sgmv, y, x, A, B, *table, ranks), device),
            A.nbytes + B.nbytes,
        )
    results["kernels"] = rows


def _attention_steps(cfg, args) -> list[tuple[str, int, int, int]]:
    """(label, sequences, context before, new tokens each): a decode batch, a prefill chunk."""
    batch, context = cfg["decode"]
    chunk = args.max_batched_tokens
    return [("decode", batch, context, 1), ("prefill", 1, chunk, chunk)]


def _attention_case(s, device, dtype, seqs: int, computed: int, new: int):
    """Random q, k, v and K/V pool of a step (16-token blocks), with its metadata for the
    reference op and for the kernel."""
    import torch

    from serve.attention import build_attention_metadata

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dtype)

    block = 16
    per_seq = -(-(computed + new) // block)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(seqs)]
    k_cache = randn(seqs * per_seq * block, s.num_kv_heads, s.head_dim)
    v_cache = randn(seqs * per_seq * block, s.num_kv_heads, s.head_dim)
    q = randn(seqs * new, s.num_heads, s.head_dim)
    k, v = (randn(seqs * new, s.num_kv_heads, s.head_dim) for _ in range(2))
    steps = (tables, [computed] * seqs, [new] * seqs, block, device)
    reference = build_attention_metadata(*steps)
    compact = build_attention_metadata(*steps, padded_groups=False)
    return (q, k, v, k_cache, v_cache), reference, compact


def _relative_error(out, expected) -> float:
    """max |out - expected| / max |expected|: the kernel must agree before its time counts."""
    return float((out.float() - expected.float()).abs().max() / expected.float().abs().max())


def _kernel_row(label: str, error: float, t_ref: float, t_kernel: float, nbytes: int) -> dict:
    print(
        f"kernels    {label}: reference {t_ref * 1e3:.3f} ms, triton {t_kernel * 1e3:.3f} ms "
        f"({t_ref / t_kernel:.2f}x); triton reads {nbytes / t_kernel / 1e9:.0f} GB/s; "
        f"relative error {error:.1e}"
    )
    return {
        "reference_ms": t_ref * 1e3,
        "triton_ms": t_kernel * 1e3,
        "bytes": nbytes,
        "relative_error": error,
    }


def _layer_weights(cfg, args):
    """One layer's seven projections of random weights ([out, in], scaled as a model's)."""
    import torch
    from transformers import LlamaConfig

    model_shape = ModelShape.from_config(LlamaConfig(**SHAPES[cfg["shape"]]))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return {
        m: torch.randn(*reversed(model_shape.lora_dims(m)), device=args.device, dtype=dtype) * 0.02
        for m in LORA_MODULES
    }, dtype


def section_matmul(cfg, args, results) -> None:
    """One layer's base projections per batch size: bitsandbytes NF4 (one module at a time, as
    peft and `--kernels reference` run them), the Triton NF4 kernel (q/k/v and gate/up stacked,
    as the engine runs them on CUDA) and bf16 (what 4x the memory buys)."""
    import torch
    import torch.nn.functional as F

    from serve.linear import Linear4bit, PackedLinear4bit

    weights, dtype = _layer_weights(cfg, args)
    groups = FUSED_GROUPS
    bnb = {m: Linear4bit(w, None, "nf4", True, dtype) for m, w in weights.items()}
    fused = {
        g: PackedLinear4bit([weights[m] for m in g], [None] * len(g), "nf4", True, dtype)
        for g in groups
    }
    packed_bytes = sum(f.packed.nbytes + f.absmax.nbytes for f in fused.values())
    layers = SHAPES[cfg["shape"]]["num_hidden_layers"]
    rows = {}
    for m in cfg["matmul_batches"]:
        xs = {
            g: torch.randn(m, weights[g[0]].shape[1], device=args.device, dtype=dtype)
            for g in groups
        }

        def run_bnb(xs=xs):
            return [torch.cat([bnb[mod](x) for mod in g], dim=1) for g, x in xs.items()]

        def run_fused(xs=xs):
            return [fused[g](x) for g, x in xs.items()]

        def run_dense(xs=xs):
            return [
                torch.cat([F.linear(x, weights[mod]) for mod in g], dim=1) for g, x in xs.items()
            ]

        error = max(_relative_error(o, e) for o, e in zip(run_fused(), run_bnb(), strict=True))
        t_bnb, t_fused, t_dense = (
            median_time(f, args.device) for f in (run_bnb, run_fused, run_dense)
        )
        rows[m] = {
            "bnb_ms": t_bnb * 1e3,
            "triton_ms": t_fused * 1e3,
            "dense_ms": t_dense * 1e3,
            "triton_gb_s": packed_bytes / t_fused / 1e9,
            "relative_error": error,
        }
        print(
            f"matmul     batch {m:4d}, one layer: bnb NF4 {t_bnb * 1e3:7.3f} ms, triton NF4 "
            f"{t_fused * 1e3:7.3f} ms ({t_bnb / t_fused:5.2f}x, reads "
            f"{packed_bytes / t_fused / 1e9:5.0f} GB/s), bf16 {t_dense * 1e3:7.3f} ms; "
            f"{layers} layers: bnb {t_bnb * layers * 1e3:6.2f} ms, triton "
            f"{t_fused * layers * 1e3:6.2f} ms; relative error {error:.1e}"
        )
    results["matmul"] = rows


def section_tune(cfg, args, results) -> None:
    """The Triton kernels' knobs swept at the shapes they serve, the cheap sweeps first (the
    stage gets what the session's budget has left): attention, LoRA, then the NF4 matmul.
    Each setting compiles once, so the grids are coarse. Prints the fastest of each, to carry
    into the kernels' defaults."""
    from transformers import LlamaConfig

    weights, dtype = _layer_weights(cfg, args)
    s = ModelShape.from_config(LlamaConfig(**SHAPES[cfg["shape"]]))
    targets = {"qkv": ("q_proj", "k_proj", "v_proj"), "down": ("down_proj",)}
    results["tune"] = best = {}
    best |= _tune_attention(cfg, args, s, dtype)
    best |= _tune_lora(cfg, args, s, dtype, targets)
    best |= _tune_nf4(cfg, args, weights, dtype, targets)


def _tune_attention(cfg, args, s: ModelShape, dtype) -> dict:
    """Keys per tile and warps, at a decode batch and a prefill chunk (at 4 warps and 64 keys
    the tile addresses spill)."""
    from serve.kernels.paged_attention import paged_attention_triton

    tiny = cfg["shape"] == "tiny"
    space = dict(block_n=(32, 64) if tiny else (32, 64, 128), num_warps=(4, 8))
    best = {}
    for label, seqs, computed, new in _attention_steps(cfg, args):
        tensors, _, compact = _attention_case(s, args.device, dtype, seqs, computed, new)
        run = partial(paged_attention_triton, *tensors, compact, s.head_dim**-0.5)
        title = f"tune       attention {label}"
        t, knobs = _fastest(run, space, {}, args.device, title)
        nbytes = tensors[3].nbytes + tensors[4].nbytes
        best[f"attention/{label}"] = _tuned(title, run, t, knobs, nbytes, args.device)
    return best


def _tune_nf4(cfg, args, weights: dict, dtype, targets: dict) -> dict:
    """The NF4 matmul on the stacked q/k/v and on down_proj at the batch sizes it serves (up
    to DEQUANTIZE_ABOVE_ROWS): tiles and split first, then warps and stages around the best
    tiles (a full grid would take most of a 10-minute call)."""
    import torch

    from serve.kernels.nf4_matmul import nf4_matmul
    from serve.linear import DEQUANTIZE_ABOVE_ROWS, PackedLinear4bit

    tiny = cfg["shape"] == "tiny"
    tiles = dict(
        block_n=(32, 64) if tiny else (32, 64, 128),
        block_k=(64,) if tiny else (64, 128, 256),
        split_k=(1, 2) if tiny else (1, 2, 4, 8),
    )
    launch = dict(num_warps=(4,) if tiny else (2, 4, 8), num_stages=(2,) if tiny else (2, 3, 4))
    batches = [m for m in cfg["matmul_batches"] if m <= DEQUANTIZE_ABOVE_ROWS]
    best = {}
    for name, group in targets.items():
        linear = PackedLinear4bit(
            [weights[m] for m in group], [None] * len(group), "nf4", True, dtype
        )
        operands = (linear.packed, linear.absmax, linear.code, linear.out_features)
        nbytes = linear.packed.nbytes + linear.absmax.nbytes
        for m in batches:
            x = torch.randn(m, weights[group[0]].shape[1], device=args.device, dtype=dtype)

            run = partial(nf4_matmul, x, *operands)
            title = f"tune       {name} batch {m:4d}"
            _, knobs = _fastest(run, tiles, {}, args.device, title)
            t, knobs = _fastest(run, launch, knobs, args.device, title)
            best[f"{name}/{m}"] = _tuned(title, run, t, knobs, nbytes, args.device)
    return best


def _tune_lora(cfg, args, s: ModelShape, dtype, targets: dict) -> dict:
    """LoRA over a decode batch of one token per adapter, launched as the model does (q/k/v
    share one shrink): the shrink's split and the expand's tile, then the expand's warps."""
    import torch

    from serve.kernels.lora_sgmv import lora_sgmv_shared
    from serve.lora_ops import LoraBatch

    tiny = cfg["shape"] == "tiny"
    batch, rank = cfg["decode"][0], cfg["rank"]
    table = LoraBatch.build(list(range(batch)), [1] * batch, args.device, kernel=True)
    space = dict(
        split_k=(1, 2) if tiny else (2, 4, 8, 16),
        block_n=(64, 128) if tiny else (128, 256, 512),
    )

    def randn(*size):
        return torch.randn(*size, device=args.device, dtype=dtype) * 0.05

    best = {}
    for name, group in targets.items():
        fan_in = s.lora_dims(group[0])[0]
        outs = [s.lora_dims(m)[1] for m in group]
        A = randn(batch, len(group) * rank, fan_in)
        Bs = [randn(batch, rank, out) for out in outs]
        ys, x = [randn(batch, out) for out in outs], randn(batch, fan_in)
        run = partial(lora_sgmv_shared, ys, x, A, Bs, table.segment_table, 1)
        title = f"tune       lora {name} {batch} adapters"
        _, knobs = _fastest(run, space, {}, args.device, title)
        t, knobs = _fastest(run, dict(num_warps=(4, 8)), knobs, args.device, title)
        nbytes = A.nbytes + sum(B.nbytes for B in Bs)
        best[f"lora_{name}/{batch}"] = _tuned(title, run, t, knobs, nbytes, args.device)
    return best


def _tuned(title: str, run, t: float, knobs: dict, nbytes: int, device) -> dict:
    """The fastest setting's row, printed beside the defaults' time."""
    t_default = median_time(run, device)
    print(
        f"{title}: best {t * 1e3:.3f} ms ({nbytes / t / 1e9:.0f} GB/s) with {knobs}; "
        f"defaults {t_default * 1e3:.3f} ms"
    )
    return {"ms": t * 1e3, "default_ms": t_default * 1e3, **knobs}


def _fastest(fn, space: dict, fixed: dict, device, label: str) -> tuple[float, dict]:
    """The fastest fn(**fixed, **setting) over the grid of settings `space`: (s, knobs)."""
    import itertools

    timed = []
    for values in itertools.product(*space.values()):
        knobs = {**fixed, **dict(zip(space, values, strict=True))}
        try:
            timed.append((median_time(partial(fn, **knobs), device), knobs))
        except Exception as error:  # a tile past the SM's shared memory, say
            print(f"{label}: {knobs}: {type(error).__name__}")
    return min(timed, key=lambda item: item[0])


def copy_bandwidth(device, nbytes: int) -> float:
    """Device memory bandwidth in bytes/s from a large copy (each byte read and written)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[2:])

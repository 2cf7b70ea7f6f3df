"""GPU serving benchmark (issue 6): a Llama-3-8B-shaped model, NF4 base, 100 rank-16 adapters.

    python bench/gpu_throughput.py                      # on a lent GPU, every section
    python bench/gpu_throughput.py --sections decode,load --kernels reference
    python bench/gpu_throughput.py --tiny               # CPU smoke run of every section

Random weights of the real shapes (speed depends on shapes, not values; nothing can be
downloaded on the GPU machine), written once to --workdir and reused by later runs. Prompts
are random token ids with chat-like lengths; outputs are forced with ignore_eos. Sections:

- kernels: each Triton kernel against the reference op it replaces, alone, on the model's
           shapes (decode and prefill attention, LoRA over distinct adapters), with the
           bandwidth it reaches: where to tune before looking at whole steps;
- matmul:  one layer's seven base projections: bitsandbytes' NF4 against the Triton NF4
           kernel (q/k/v and gate/up stacked, as the engine runs them) and bf16, per batch;
- tune:    the Triton NF4 kernel's block sizes, split and warps swept per batch size;
- serve:   tokens/s, TTFT and ITL of loraplex over all requests with 100 adapters, and the same
           requests with no adapter (goal: adapters keep >= 90 % of the tokens/s);
- peft:    peft's mixed-batch `generate` in static batches against loraplex on the same first
           --peft-requests requests (goal: loraplex >= 30x);
- decode:  one decode step at batch 64, each sequence with its own adapter, against the
           memory-bandwidth floor: bytes of weights, KV and adapters read per step over the
           measured device copy bandwidth (goal: the floor is >= 70 % of the step);
- load:    the step that copies an adapter from the host tier into a slot while 32 others
           decode, against the steps around it.
Results are printed and written as JSON to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.throughput import pct, run_loraplex, run_peft, write_random_adapters  # noqa: E402
from serve.llama import LORA_MODULES, PARENT_OF, ModelShape  # noqa: E402

SHAPES = {
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
}
SECTIONS = ("kernels", "matmul", "tune", "serve", "peft", "decode", "load")
# Per mode: requests, adapters, rank, prompt and output (median, max) tokens, max running
# sequences, peft requests, decode (batch, context), KV pool GiB, matmul batch sizes.
MODES = {
    "gpu": dict(
        shape="llama3-8b",
        requests=256,
        adapters=100,
        rank=16,
        prompt=(160, 1024),
        output=(96, 256),
        max_seqs=64,
        peft_requests=64,
        decode=(64, 512),
        kv_gb=20.0,
        matmul_batches=(1, 16, 64, 256, 1024),
    ),
    "tiny": dict(
        shape="tiny",
        requests=16,
        adapters=12,
        rank=4,
        prompt=(12, 40),
        output=(6, 16),
        max_seqs=8,
        peft_requests=8,
        decode=(4, 24),
        kv_gb=0.05,
        matmul_batches=(1, 8, 300),
    ),
}


def write_random_base(folder: Path, shape: dict, device, dtype) -> Path:
    """A Llama folder of random weights (one safetensors shard per layer, with the index
    transformers wants) and a word-level tokenizer: all an engine or peft needs to load."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config.save_pretrained(folder)
    write_tokenizer(folder, min(shape["vocab_size"], 1000))
    model_shape = ModelShape.from_config(config)
    h = shape["hidden_size"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size):
        return (torch.randn(*size, generator=gen, device=device, dtype=dtype) * 0.02).cpu()

    weight_map = {}

    def save(name: str, tensors: dict) -> None:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    ones = torch.ones(h, dtype=dtype)
    save(
        "embed.safetensors",
        {
            "model.embed_tokens.weight": rand(shape["vocab_size"], h),
            "lm_head.weight": rand(shape["vocab_size"], h),
            "model.norm.weight": ones,
        },
    )
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors = {
            f"{p}.{PARENT_OF[m]}.{m}.weight": rand(*reversed(model_shape.lora_dims(m)))
            for m in LORA_MODULES
        }
        tensors[f"{p}.input_layernorm.weight"] = ones.clone()
        tensors[f"{p}.post_attention_layernorm.weight"] = ones.clone()
        save(f"layer-{layer:03d}.safetensors", tensors)
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "complete").touch()
    return folder


def write_tokenizer(folder: Path, size: int) -> None:
    """Word-level tokens t0..t{size-1}: prompts are token ids, so only loading matters."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{j}": j for j in range(size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t2"
    ).save_pretrained(folder)


def chat_workload(n: int, n_adapters: int, vocab: int, prompt, output, seed: int = 0):
    """Random prompts and output lengths, both log-normal around the given medians (chat
    traffic: mostly short, a long tail), clipped to the maxima; adapters round-robin."""
    rng = random.Random(seed)

    def draw(median, top, low):
        return max(low, min(top, round(rng.lognormvariate(math.log(median), 0.8))))

    prompts = [[rng.randrange(3, vocab) for _ in range(draw(*prompt, 4))] for _ in range(n)]
    lengths = [draw(*output, 2) for _ in range(n)]
    return prompts, lengths, [i % n_adapters for i in range(n)]


def copy_bandwidth(device, nbytes: int) -> float:
    """Device memory bandwidth in bytes/s from a large copy (each byte read and written)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[2:])


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_bytes(engine, seqs) -> dict[str, int]:
    """Bytes one decode step must read: every base weight once, the KV of every sequence's
    context, and the padded A and B of every distinct adapter slot in the batch."""
    from serve.linear import DenseLinear, PackedLinear4bit

    model = engine.model
    weights = model.lm_head.nbytes
    for layer in model.layers:
        weights += layer.input_norm.nbytes + layer.post_norm.nbytes
        for linear in layer.linears.values():
            if isinstance(linear, DenseLinear):
                weights += linear.weight.nbytes
            elif isinstance(linear, PackedLinear4bit):
                weights += linear.packed.nbytes + linear.absmax.nbytes + linear.code.nbytes
            else:
                state = linear.state
                weights += linear.packed.nbytes + state.absmax.nbytes + state.code.nbytes
                if state.nested:
                    weights += state.state2.absmax.nbytes + state.state2.code.nbytes
    s = model.shape
    per_token_kv = s.num_layers * 2 * s.num_kv_heads * s.head_dim * model.dtype.itemsize
    kv = sum(seq.num_tokens for seq in seqs) * per_token_kv
    pool = engine.pool
    per_slot = sum(a[:, 0].nbytes + pool.B[m][:, 0].nbytes for m, a in pool.A.items())
    slots = {engine.slots.slot_of[seq.adapter_uid] for seq in seqs if seq.adapter_uid}
    return {"weights": weights, "kv": kv, "adapters": per_slot * len(slots)}


def start_decoding(engine, prompts, adapters, max_tokens: int):
    """Add requests and step until every one has its first token: from then on each step is
    a pure decode of all of them."""
    from serve import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params, a) for p, a in zip(prompts, adapters, strict=True)]
    started: set[str] = set()
    while len(started) < len(ids):
        started.update(o.request_id for o in engine.step() if o.delta_token_ids)
    return ids


def timed_steps(engine, count: int) -> list[float]:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def stop(engine, ids) -> None:
    for request_id in ids:
        engine.abort(request_id)
    while engine.has_unfinished:
        engine.step()


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
            _median_time(ref, device),
            _median_time(kernel, device),
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
            _median_time(partial(lora_gathered, y, x, A, B, gathered), device),
            _median_time(partial(lora_sgmv, y, x, A, B, *table, ranks), device),
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
    groups = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
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
            _median_time(f, args.device) for f in (run_bnb, run_fused, run_dense)
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
    """The Triton NF4 kernel's knobs swept on the stacked q/k/v and on down_proj at the batch
    sizes it serves (up to DEQUANTIZE_ABOVE_ROWS): tiles and split first, then warps and
    stages around the best tiles (each setting compiles once: a full grid would take most
    of a 10-minute call). Prints the fastest of each, to carry into `nf4_matmul`."""
    import torch

    from serve.kernels.nf4_matmul import nf4_matmul
    from serve.linear import DEQUANTIZE_ABOVE_ROWS, PackedLinear4bit

    weights, dtype = _layer_weights(cfg, args)
    targets = {"qkv": ("q_proj", "k_proj", "v_proj"), "down": ("down_proj",)}
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
            label = f"tune       {name} batch {m}"
            _, knobs = _fastest(run, tiles, {}, args.device, label)
            t, knobs = _fastest(run, launch, knobs, args.device, label)
            t_default = _median_time(run, args.device)
            best[f"{name}/{m}"] = {"ms": t * 1e3, "default_ms": t_default * 1e3, **knobs}
            print(
                f"tune       {name} batch {m:4d}: best {t * 1e3:.3f} ms "
                f"({nbytes / t / 1e9:.0f} GB/s) with {knobs}; defaults {t_default * 1e3:.3f} ms"
            )
    # attention: keys per tile and warps (at 4 warps and 64 keys the tile addresses spill)
    from transformers import LlamaConfig

    from serve.kernels.paged_attention import paged_attention_triton

    s = ModelShape.from_config(LlamaConfig(**SHAPES[cfg["shape"]]))
    space = dict(block_n=(32, 64) if tiny else (32, 64, 128), num_warps=(4, 8))
    for label, seqs, computed, new in _attention_steps(cfg, args):
        tensors, _, compact = _attention_case(s, args.device, dtype, seqs, computed, new)
        run = partial(paged_attention_triton, *tensors, compact, s.head_dim**-0.5)
        t, knobs = _fastest(run, space, {}, args.device, f"tune       attention {label}")
        t_default = _median_time(run, args.device)
        nbytes = tensors[3].nbytes + tensors[4].nbytes
        best[f"attention/{label}"] = {"ms": t * 1e3, "default_ms": t_default * 1e3, **knobs}
        print(
            f"tune       attention {label}: best {t * 1e3:.3f} ms ({nbytes / t / 1e9:.0f} GB/s) "
            f"with {knobs}; defaults {t_default * 1e3:.3f} ms"
        )
    results["tune"] = best


def _fastest(fn, space: dict, fixed: dict, device, label: str) -> tuple[float, dict]:
    """The fastest fn(**fixed, **setting) over the grid of settings `space`: (s, knobs)."""
    import itertools

    timed = []
    for values in itertools.product(*space.values()):
        knobs = {**fixed, **dict(zip(space, values, strict=True))}
        try:
            timed.append((_median_time(partial(fn, **knobs), device), knobs))
        except Exception as error:  # a tile past the SM's shared memory, say
            print(f"{label}: {knobs}: {type(error).__name__}")
    return min(timed, key=lambda item: item[0])


def _median_time(fn, device, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_llm(cfg, args, base: Path):
    from serve import LLM

    return LLM(
        base_model=str(base),
        quantization=None if args.quantization == "none" else args.quantization,
        device=args.device,
        kernels=args.kernels,
        cuda_graphs=args.cuda_graphs,
        max_num_seqs=cfg["max_seqs"],
        max_num_batched_tokens=args.max_batched_tokens,
        max_loras=cfg["max_seqs"],  # slots never hold back a batch of distinct adapters
        max_lora_rank=cfg["rank"],
        max_cpu_loras=cfg["adapters"],
        kv_cache_memory_gb=cfg["kv_gb"],
    )


def section_serve(llm, cfg, names, results) -> None:
    prompts, lengths, index = chat_workload(
        cfg["requests"], cfg["adapters"], cfg["vocab"], cfg["prompt"], cfg["output"]
    )
    llm.generate([prompts[0]], adapters=[names[0]])  # warm-up: compile the kernels
    runs = {}
    for label, adapters in (("adapters", [names[i] for i in index]), ("none", None)):
        run = run_loraplex(llm, prompts, lengths, adapters or [None] * len(prompts))
        runs[label] = run
        print(
            f"serve      {label:8s} {run['tokens_per_s']:9.1f} tokens/s ({run['tokens']} tokens "
            f"in {run['seconds']:.1f} s); TTFT ms p50 {pct(run['ttft'], 50):.0f} p90 "
            f"{pct(run['ttft'], 90):.0f} p99 {pct(run['ttft'], 99):.0f}; ITL ms p50 "
            f"{pct(run['itl'], 50):.1f} p90 {pct(run['itl'], 90):.1f} p99 {pct(run['itl'], 99):.1f}"
        )
    ratio = runs["adapters"]["tokens_per_s"] / runs["none"]["tokens_per_s"]
    print(
        f"serve      {cfg['adapters']} adapters keep {ratio:.1%} of no-adapter tokens/s (goal 90 %)"
    )
    results["serve"] = {
        label: {
            "tokens_per_s": r["tokens_per_s"],
            "tokens": r["tokens"],
            "seconds": r["seconds"],
            "ttft_ms": {q: pct(r["ttft"], q) for q in (50, 90, 99)},
            "itl_ms": {q: pct(r["itl"], q) for q in (50, 90, 99)},
            "stats": r["stats"],
        }
        for label, r in runs.items()
    } | {"adapters_vs_none": ratio}


def section_peft(llm, cfg, args, base, folders, names, results) -> None:
    """loraplex and peft on the same first --peft-requests requests; peft after loraplex is
    freed, so each has the device to itself."""
    prompts, lengths, index = chat_workload(
        cfg["requests"], cfg["adapters"], cfg["vocab"], cfg["prompt"], cfg["output"]
    )
    n = cfg["peft_requests"]
    prompts, lengths, index = prompts[:n], lengths[:n], index[:n]
    ours = run_loraplex(llm, prompts, lengths, [names[i] for i in index])
    results["peft"] = {"loraplex_tokens_per_s": ours["tokens_per_s"]}
    return lambda: _run_peft_after(cfg, args, base, folders, prompts, lengths, index, ours, results)


def _run_peft_after(cfg, args, base, folders, prompts, lengths, index, ours, results) -> None:
    used = sorted(set(index))
    peft = run_peft(
        base,
        [folders[i] for i in used],
        prompts,
        lengths,
        [used.index(i) for i in index],
        None if args.quantization == "none" else args.quantization,
        batch=cfg["max_seqs"],
        device=args.device,
    )
    ratio = ours["tokens_per_s"] / peft["tokens_per_s"]
    print(
        f"peft       {peft['tokens_per_s']:9.1f} tokens/s on {len(prompts)} requests, loraplex "
        f"{ours['tokens_per_s']:.1f}: {ratio:.1f}x (goal 30x)"
    )
    results["peft"] |= {"peft_tokens_per_s": peft["tokens_per_s"], "ratio": ratio}


def section_decode(llm, cfg, args, names, results) -> None:
    """Decode steps at `batch` sequences of distinct adapters against the bandwidth floor;
    with --cuda-graphs, the same steps eager and replayed, alternating, on one engine."""
    engine = llm.engine
    batch, context = cfg["decode"]
    rng = random.Random(1)
    prompts = [[rng.randrange(3, cfg["vocab"]) for _ in range(context)] for _ in range(batch)]
    adapters = [names[i % len(names)] for i in range(batch)]
    steps = args.decode_steps
    graphs = engine.runner.graphs
    ids = start_decoding(engine, prompts, adapters, max_tokens=2 * steps + 8)
    seqs = list(engine.scheduler.running)
    times = {"eager": [], "graphs": []} if graphs is not None else {"eager": []}
    for _ in range(steps):
        for label in times:
            engine.runner.graphs = graphs if label == "graphs" else None
            times[label] += timed_steps(engine, 1)
    engine.runner.graphs = graphs
    medians = {label: statistics.median(t[1:]) for label, t in times.items()}
    step = min(medians.values())
    parts = step_bytes(engine, seqs)
    stop(engine, ids)
    bandwidth = copy_bandwidth(args.device, args.copy_bytes)
    floor = sum(parts.values()) / bandwidth
    steps_text = ", ".join(f"{label} {t * 1e3:.2f} ms" for label, t in medians.items())
    print(
        f"decode     batch {batch}, context {context}: step {steps_text}; bytes per step "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in parts.items())
        + f"; copy bandwidth {bandwidth / 1e12:.2f} TB/s; floor {floor * 1e3:.2f} ms = "
        f"{floor / step:.1%} of the faster step (goal 70 %)"
    )
    results["decode"] = {
        "batch": batch,
        "context": context,
        "step_ms": step * 1e3,
        **{f"{label}_step_ms": t * 1e3 for label, t in medians.items()},
        "bytes": parts,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "floor_ms": floor * 1e3,
        "floor_fraction": floor / step,
    }


def section_load(llm, cfg, args, names, results) -> None:
    """While half the slots' sequences decode, a request for an adapter that is in host memory
    but in no slot arrives: the step that copies it in (and prefills the 32-token prompt),
    against the decode steps around it; then the copy alone, repeated into the same slot."""
    engine = llm.engine
    running = max(1, cfg["max_seqs"] // 2)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, cfg["vocab"]) for _ in range(32)] for _ in range(running + 1)]
    ids = start_decoding(engine, prompts[:running], names[:running], max_tokens=64)
    in_slots = set(engine.slots.contents)
    outside = [n for n in names[running:] if engine.adapters[n].uid not in in_slots]
    if not outside:
        stop(engine, ids)
        print("load       every adapter is in a slot: nothing to measure")
        return
    before = timed_steps(engine, 5)
    ids += start_decoding_one(engine, prompts[-1], outside[-1])
    loads = engine.slots.loads
    load_step = None
    after = []
    for _ in range(5):
        after += timed_steps(engine, 1)
        if engine.slots.loads > loads and load_step is None:
            load_step = after.pop()
    uid = engine.adapters[outside[-1]].uid
    slot = engine.slots.slot_of[uid]
    copy = _median_time(lambda: engine.pool.load_slot(slot, uid), args.device, repeats=3)
    stop(engine, ids)
    base = statistics.median(before + after)
    print(
        f"load       step with a host-to-slot adapter copy {load_step * 1e3:.2f} ms against "
        f"{base * 1e3:.2f} ms for {running} decodes; the copy alone {copy * 1e3:.2f} ms"
    )
    results["load"] = {
        "load_step_ms": load_step * 1e3,
        "median_step_ms": base * 1e3,
        "copy_ms": copy * 1e3,
    }


def start_decoding_one(engine, prompt, adapter) -> list[str]:
    from serve import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    return [engine.add_request(prompt, params, adapter)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: a smoke test")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"])
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="decode steps as CUDA graphs (needs CUDA)"
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / ".loraplex" / "bench-gpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--copy-bytes", type=int, default=2**31)
    args = parser.parse_args()

    import torch

    mode = "tiny" if args.tiny else "gpu"
    cfg = dict(MODES[mode])
    shape = SHAPES[cfg["shape"]]
    cfg["vocab"] = shape["vocab_size"]
    args.device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        # The kernels run on CPU only through Triton's interpreter, chosen when they are
        # defined: set before anything imports them (timings then mean nothing).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.workdir = args.workdir.with_name(args.workdir.name + "-tiny")
        args.max_batched_tokens = 64
        args.decode_steps = 4
        args.copy_bytes = 2**26
        if args.kernels == "triton" or args.cuda_graphs:
            import serve.engine

            # the engine takes the kernels on CUDA only; here they run interpreted
            serve.engine.use_triton = lambda _device, mode: mode != "reference"
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny for the CPU smoke test")
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(unknown)}; known: {', '.join(SECTIONS)}")

    from registry.home import setup_environment

    setup_environment()  # LORAPLEX_HOME, as the engine expects
    results: dict = {"mode": mode, "kernel_mode": args.kernels, "quantization": args.quantization}
    if args.device == "cuda":
        results["device"] = torch.cuda.get_device_name()
    if "kernels" in sections:
        section_kernels(cfg, args, results)
    if "matmul" in sections:
        section_matmul(cfg, args, results)
    if "tune" in sections:
        section_tune(cfg, args, results)
    peft_later = None
    if {"serve", "peft", "decode", "load"} & set(sections):  # these need a model on disk
        t0 = time.perf_counter()
        dtype = torch.float32 if args.tiny else torch.bfloat16
        base = write_random_base(args.workdir / "base", shape, args.device, dtype)
        adapters_dir = args.workdir / f"adapters-r{cfg['rank']}"
        folders = sorted(adapters_dir.glob("adapter-*"))
        if len(folders) < cfg["adapters"]:
            import shutil

            shutil.rmtree(adapters_dir, ignore_errors=True)
            folders = write_random_adapters(base, adapters_dir, cfg["adapters"], cfg["rank"])
        print(
            f"setup      {cfg['shape']} ({args.quantization}, kernels {args.kernels}), "
            f"{cfg['adapters']} adapters of rank {cfg['rank']}: {time.perf_counter() - t0:.0f} s"
        )
        t0 = time.perf_counter()
        llm = make_llm(cfg, args, base)
        names = [f"a{i}" for i in range(cfg["adapters"])]
        for name, folder in zip(names, folders, strict=False):
            llm.load_adapter(name, str(folder))
        print(f"engine     loaded with {len(names)} adapters in {time.perf_counter() - t0:.0f} s")
        if "serve" in sections:
            section_serve(llm, cfg, names, results)
        if "decode" in sections:
            section_decode(llm, cfg, args, names, results)
        if "load" in sections:
            section_load(llm, cfg, args, names, results)
        if "peft" in sections:
            peft_later = section_peft(llm, cfg, args, base, folders, names, results)
        del llm
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if peft_later is not None:
        peft_later()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

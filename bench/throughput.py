"""Serving throughput: loraplex against peft's mixed-adapter `generate` in static batches.

    .venv/bin/python bench/throughput.py [--requests 128] [--adapters 8] [--sweep] [--threads N]
                                         [--temperature T --top-p P] [--dtype bfloat16]

Same process, same SmolLM2 base (NF4 by default), same prompts (questions from the demo data)
and the same output lengths, drawn heavy-tailed like chat traffic and forced with ignore_eos.
At most 32 sequences run at once on both sides. The baseline is what serving looks like
without continuous batching: padded batches of 32 in arrival order, each running until its
longest member is done. On CPU the engine dequantizes the NF4 weights once, at load (memory
for speed); peft then runs on the same dequantized weights (identical logits), so the ratio
is batching and kernels, not a dequantization peft repeats at every call (`--peft-weights
nf4` measures that). Random rank-16 adapters on all seven Llama modules stand in for trained
ones (speed depends on shapes, not values). Greedy by default; `--temperature` (and
`--top-p`) sample on both sides, as chat clients ask; `--dtype bfloat16` runs both in bf16.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GAUGES = ("running", "waiting", "kv_blocks_used", "kv_blocks_total")  # engine stats: not counters


def write_random_adapters(
    base_path: Path, folder: Path, count: int, rank: int, dtype=None, device="cpu"
) -> list[Path]:
    """PEFT LoRA folders written directly (no model instantiation): fast for 128 adapters.
    `dtype` (default fp32) as stored: bf16 halves what 100 Llama-3-8B adapters take on disk.
    `device` draws the numbers: a CPU core takes 0.25 s for one Llama-3-8B adapter's 42 M, so
    25 s of a short GPU lease for 100."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from serve.llama import LORA_MODULES, PARENT_OF, ModelShape

    shape = ModelShape.from_config(AutoConfig.from_pretrained(base_path))
    paths = []
    for i in range(count):
        gen = torch.Generator(device).manual_seed(i)

        def rand(*size, gen=gen):
            values = torch.randn(*size, generator=gen, device=device) * 0.02
            return values.to(dtype or torch.float32).cpu()

        state = {}
        for layer in range(shape.num_layers):
            for m in LORA_MODULES:
                fan_in, fan_out = shape.lora_dims(m)
                key = f"base_model.model.model.layers.{layer}.{PARENT_OF[m]}.{m}"
                state[f"{key}.lora_A.weight"] = rand(rank, fan_in)
                state[f"{key}.lora_B.weight"] = rand(fan_out, rank)
        path = folder / f"adapter-{i:03d}"
        path.mkdir(parents=True)
        save_file(state, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "r": rank,
                    "lora_alpha": 2 * rank,
                    "target_modules": list(LORA_MODULES),
                    "lora_dropout": 0.0,
                    "bias": "none",
                    "base_model_name_or_path": str(base_path),
                }
            )
        )
        paths.append(path)
    return paths


def workload(tokenizer, n: int, n_adapters: int, max_output: int, seed: int = 0):
    """Prompts (token ids), output lengths (log-normal, median ~24) and adapter per request."""
    from serve.prompts import chat_prompt_ids
    from train.demo_data import construction_faq, country_facts

    questions = [r["instruction"] for r in construction_faq()]
    questions += [r["messages"][0]["content"] for r in country_facts()]
    rng = random.Random(seed)
    prompts, lengths, adapters = [], [], []
    for i in range(n):
        question = [{"role": "user", "content": rng.choice(questions)}]
        prompts.append(chat_prompt_ids(tokenizer, question))
        lengths.append(max(4, min(max_output, round(rng.lognormvariate(math.log(24), 0.9)))))
        adapters.append(i % n_adapters)
    return prompts, lengths, adapters


def run_loraplex(llm, prompts, lengths, adapter_names, temperature=0.0, top_p=1.0) -> dict:
    from serve import SamplingParams

    engine = llm.engine
    before = engine.stats
    t0 = time.perf_counter()
    times: dict[str, list[float]] = {}
    for p, n, a in zip(prompts, lengths, adapter_names, strict=True):
        params = SamplingParams(max_tokens=n, temperature=temperature, top_p=top_p, ignore_eos=True)
        rid = engine.add_request(p, params, a)
        times[rid] = []
    peak_blocks = 0
    admitted: dict[str, float] = {}  # when the step that first scheduled it began

    def deliver(outputs) -> None:  # when a server would send them: made, mid-step if overlapped
        now = time.perf_counter()
        for out in outputs:
            times[out.request_id] += [now] * len(out.delta_token_ids)

    while engine.has_unfinished:
        began = time.perf_counter()
        engine.step(deliver)
        for seq in engine.scheduler.running:
            admitted.setdefault(seq.request_id, began)
        peak_blocks = max(peak_blocks, engine.allocator.num_used_blocks)
    wall = time.perf_counter() - t0
    tokens = sum(len(t) for t in times.values())
    ttft = sorted(t[0] - t0 for t in times.values())
    # from admission: the prefill's latency, without the wait for one of the running places
    ttft_admitted = sorted(t[0] - admitted.get(rid, t0) for rid, t in times.items())
    itl = sorted(b - a for t in times.values() for a, b in itertools.pairwise(t))
    return {
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft": ttft,
        "ttft_admitted": ttft_admitted,
        "itl": itl,
        "peak_blocks": peak_blocks,
        "blocks": engine.num_blocks,
        # counters of this run only (the engine's own are cumulative; gauges left out)
        "stats": {k: v - before[k] for k, v in engine.stats.items() if k not in GAUGES},
    }


def run_peft(
    base_path,
    folders,
    prompts,
    lengths,
    adapter_index,
    quantization,
    batch=32,
    device="cpu",
    temperature=0.0,
    top_p=1.0,
    dtype_name="auto",
    dequantize=False,
    deadline=None,
):
    """peft's mixed-batch `generate` over the requests in static batches: useful tokens (each
    request's own length) per second. `deadline` (a `time.perf_counter()` value) cuts a
    batch's generate when it passes; tokens then count up to the step it reached ("cut"),
    when every request still generates, so a cut run's rate is, if anything, too high."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if dtype_name == "auto":  # as the engine's
        dtype_name = "float32" if device == "cpu" else "bfloat16"
    dtype = getattr(torch, dtype_name)
    kwargs = {"dtype": dtype, "device_map": device}
    if quantization:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if quantization and dequantize:  # the NF4 values, in dense weights
        model = model.dequantize()
    # The adapters in the dtype they are stored in, as the engine runs them (peft's default
    # upcasts bf16 adapters to fp32).
    # low_cpu_mem_usage: no random init of each adapter's weights before they are read
    load = {"autocast_adapter_dtype": False, "low_cpu_mem_usage": True}
    model = PeftModel.from_pretrained(model, folders[0], adapter_name="a0", **load)
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{i}", **load)
    model.eval()
    pad = model.generation_config.eos_token_id
    pad = pad if isinstance(pad, int) else pad[0]
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    t0 = time.perf_counter()
    useful, cut = 0, False
    for start in range(0, len(prompts), batch):
        group = range(start, min(start + batch, len(prompts)))
        width = max(len(prompts[i]) for i in group)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in group])
        mask = (
            torch.arange(width)[None, :]
            >= torch.tensor([width - len(prompts[i]) for i in group])[:, None]
        ).long()
        ids, mask = ids.to(device), mask.to(device)
        steps = max(lengths[i] for i in group)
        if deadline is not None:
            if deadline - time.perf_counter() < 1:
                cut = True
                break
            sampling["max_time"] = deadline - time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=steps,
                min_new_tokens=steps,
                pad_token_id=pad,
                adapter_names=[f"a{adapter_index[i]}" for i in group],
                **sampling,
            )
        done = out.shape[1] - width
        cut |= done < steps
        useful += sum(min(lengths[i], done) for i in group)
    wall = time.perf_counter() - t0
    return {"tokens": useful, "seconds": wall, "tokens_per_s": useful / wall, "cut": cut}


def pct(values, q):
    return values[min(len(values) - 1, int(q / 100 * len(values)))] * 1000 if values else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--peft-weights",
        default="as-engine",
        choices=["as-engine", "nf4"],
        help="peft's base: the weights as the engine holds them (CPU: NF4 dequantized once), "
        "or bitsandbytes' NF4 layers, which dequantize at every call",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also tokens/s with 1, 8, 32, 128 distinct adapters (8 slots)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for the whole process, both sides (default: torch's)",
    )
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from registry.base_model import resolve_base_model
    from registry.home import setup_environment
    from serve import LLM

    home = setup_environment()
    base = resolve_base_model("smollm2-135m-instruct", home)
    quantization = None if args.quantization == "none" else args.quantization
    counts = sorted({args.adapters, *([1, 8, 32, 128] if args.sweep else [])})
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_random_adapters(base.path, Path(tmp), max(counts), rank=16)
        llm = LLM(
            base_model=str(base.path),
            quantization=quantization,
            max_num_seqs=32,
            max_loras=8,
            max_lora_rank=16,
            max_cpu_loras=32,
            kv_cache_memory_gb=1.0,
            dtype=args.dtype,
        )
        for i, folder in enumerate(folders):
            llm.load_adapter(f"a{i}", str(folder))
        prompts, lengths, index = workload(
            llm.tokenizer, args.requests, args.adapters, args.max_output
        )
        names = [f"a{i}" for i in index]
        llm.generate([prompts[0]], adapters=[names[0]])  # warm-up
        sampling = {"temperature": args.temperature, "top_p": args.top_p}
        ours = run_loraplex(llm, prompts, lengths, names, **sampling)
        print(
            f"workload: {args.requests} requests over {args.adapters} adapters, "
            f"{args.quantization} base, outputs {min(lengths)}..{max(lengths)} tokens "
            f"(median {statistics.median(lengths):.0f}), at most 32 running, "
            + (f"T {args.temperature} top_p {args.top_p}" if args.temperature else "greedy")
            + f", dtype {args.dtype}"
        )
        # peft on dense weights where the engine dequantized its NF4 ones at load
        dequantize = args.peft_weights == "as-engine" and not llm.engine.model.keeps_4bit
        if quantization:
            held = "NF4 dequantized once, as the engine's" if dequantize else "bitsandbytes' NF4"
            print(f"peft base: {held}")
        print(
            f"loraplex   {ours['tokens_per_s']:8.1f} tokens/s  ({ours['tokens']} tokens in "
            f"{ours['seconds']:.1f} s)"
        )
        if not args.skip_baseline:
            peft = run_peft(
                base.path,
                folders[: args.adapters],
                prompts,
                lengths,
                index,
                quantization,
                dtype_name=args.dtype,
                dequantize=dequantize,
                **sampling,
            )
            print(
                f"peft       {peft['tokens_per_s']:8.1f} tokens/s  ({peft['tokens']} tokens in "
                f"{peft['seconds']:.1f} s)"
            )
            print(f"ratio      {ours['tokens_per_s'] / peft['tokens_per_s']:8.2f}x")
        print(
            f"TTFT ms    p50 {pct(ours['ttft'], 50):.0f}  p90 {pct(ours['ttft'], 90):.0f}  "
            f"p99 {pct(ours['ttft'], 99):.0f} from the burst's start (queueing for one of 32 "
            f"places included); p50 {pct(ours['ttft_admitted'], 50):.0f}  p90 "
            f"{pct(ours['ttft_admitted'], 90):.0f}  p99 {pct(ours['ttft_admitted'], 99):.0f} "
            "from admission"
        )
        print(
            f"ITL ms     p50 {pct(ours['itl'], 50):.0f}  p90 {pct(ours['itl'], 90):.0f}  "
            f"p99 {pct(ours['itl'], 99):.0f}"
        )
        print(f"KV blocks  peak used {ours['peak_blocks']} of {ours['blocks']} reserved")
        if args.sweep:
            print("distinct adapters (8 device slots, 32 in host memory): tokens/s")
            for n in counts:
                prompts_n, lengths_n, index_n = workload(
                    llm.tokenizer, args.requests, n, args.max_output
                )
                r = run_loraplex(llm, prompts_n, lengths_n, [f"a{i}" for i in index_n], **sampling)
                s = r["stats"]
                print(
                    f"  {n:4d}  {r['tokens_per_s']:8.1f}  (slot loads {s['adapter_slot_loads']},"
                    f" host evictions {s['adapter_host_evictions']})"
                )


if __name__ == "__main__":
    main()

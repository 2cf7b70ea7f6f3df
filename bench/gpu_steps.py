"""The GPU benchmark's step sections: single engine steps on the random 8B model.

- decode: one decode step at batch 64, each sequence with its own adapter, against the
          memory-bandwidth floor (bytes of weights, KV and adapters read per step over the
          measured device copy bandwidth); with CUDA graphs, eager and replayed alternating;
- load:   the steps that copy an adapter from the host tier into a slot while 32 others
          decode, against the same steps for an adapter already in a slot, in pairs.
"""

from __future__ import annotations

import random
import statistics
import time

from bench.gpu_kernels import copy_bandwidth
from bench.timing import median_time


def step_bytes(engine, seqs, context_tokens: float) -> dict[str, int]:
    """Bytes one decode step must read: every base weight once, the KV of `context_tokens`
    tokens over all sequences, and the padded A and B of every distinct adapter slot in the
    batch. "weights" in the engine's own layout (the Triton NF4 kernel reads fp32 scales);
    "weights_double_quant" as bitsandbytes' smallest NF4, 8-bit scales (the stricter floor)."""
    from serve.kv_budget import kv_block_bytes
    from serve.linear import DenseLinear, PackedLinear4bit

    model = engine.model
    weights = smallest = model.lm_head.nbytes
    for layer in model.layers:
        norms = layer.input_norm.nbytes + layer.post_norm.nbytes
        weights += norms
        smallest += norms
        for linear in layer.linears.values():
            if isinstance(linear, DenseLinear):
                weights += linear.weight.nbytes
                smallest += linear.weight.nbytes
                continue
            if isinstance(linear, PackedLinear4bit):
                weights += linear.packed.nbytes + linear.absmax.nbytes + linear.code.nbytes
            else:
                state = linear.state
                weights += linear.packed.nbytes + state.absmax.nbytes + state.code.nbytes
                if state.nested:
                    weights += state.state2.absmax.nbytes + state.state2.code.nbytes
            params = 2 * linear.packed.numel()  # two 4-bit values a byte
            # 4 bits a weight, a uint8 scale per 64, an fp32 scale of those per 256 scales
            smallest += params // 2 + params // 64 + 4 * (params // (64 * 256))
    per_token_kv = kv_block_bytes(model.shape, 1, model.dtype)
    slots = {engine.slots.slot_of[seq.adapter_uid] for seq in seqs if seq.adapter_uid}
    return {
        "weights": weights,
        "weights_double_quant": smallest,
        "kv": round(context_tokens * per_token_kv),
        "adapters": slot_bytes(engine.pool) * len(slots),
    }


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


def section_decode(llm, cfg, args, names, results) -> None:
    """Decode steps at `batch` sequences of distinct adapters against the bandwidth floor;
    eager, and with --cuda-graphs replayed with the outputs made during the next step's
    forward pass (as the engine does on CUDA) and after it, on one engine: two steps a
    mode in turn, the second timed (the first takes the switch)."""
    engine = llm.engine
    batch, context = cfg["decode"]
    rng = random.Random(1)
    prompts = [[rng.randrange(3, cfg["vocab"]) for _ in range(context)] for _ in range(batch)]
    adapters = [names[i % len(names)] for i in range(batch)]
    steps = args.decode_steps
    graphs, overlap = engine.runner.graphs, engine.overlap_outputs
    modes = {"eager": (None, True)}  # label: (graphs, overlap_outputs)
    if graphs is not None:
        modes |= {"graphs": (graphs, True), "graphs_outputs_after": (graphs, False)}
    # Tokens for every timed step, after those the first sequences made while the prompts
    # were still prefilling (a token a step, and a step's lag with overlapped outputs)
    prefill_steps = -(-batch * context // args.max_batched_tokens) + 2
    ids = start_decoding(engine, prompts, adapters, 2 * len(modes) * steps + prefill_steps + 8)
    seqs = list(engine.scheduler.running)
    context_before = sum(seq.num_tokens for seq in seqs)
    times = {label: [] for label in modes}
    for _ in range(steps):
        for label, mode in modes.items():
            engine.runner.graphs, engine.overlap_outputs = mode
            times[label] += timed_steps(engine, 2)[1:]
    engine.runner.graphs, engine.overlap_outputs = graphs, overlap
    if len(engine.scheduler.running) < batch:  # a timed step ran a smaller batch
        raise RuntimeError(f"decode: {len(engine.scheduler.running)} of {batch} still running")
    medians = {label: statistics.median(t[1:]) for label, t in times.items()}
    step = min(medians.values())
    # The KV read grows a token a sequence a step: at the timed steps' middle, their median.
    context_after = sum(seq.num_tokens for seq in seqs)
    parts = step_bytes(engine, seqs, (context_before + context_after) / 2)
    stop(engine, ids)
    bandwidth = copy_bandwidth(args.device, args.copy_bytes)
    read = parts["kv"] + parts["adapters"]
    floor = (read + parts["weights"]) / bandwidth
    strict = (read + parts["weights_double_quant"]) / bandwidth
    steps_text = ", ".join(f"{label} {t * 1e3:.2f} ms" for label, t in medians.items())
    print(
        f"decode     batch {batch}, context {context}: step {steps_text}; bytes per step "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in parts.items())
        + f"; copy bandwidth {bandwidth / 1e12:.2f} TB/s; floor {floor * 1e3:.2f} ms = "
        f"{floor / step:.1%} of the faster step (goal 70 %); with double-quant NF4 weights "
        f"{strict * 1e3:.2f} ms = {strict / step:.1%}"
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
        "floor_double_quant_ms": strict * 1e3,
        "floor_double_quant_fraction": strict / step,
    }


def section_load(llm, cfg, args, names, results) -> None:
    """While half the slots' sequences decode, requests for adapters that are in host memory
    but in no slot arrive one at a time: each step that copies one in and prefills its
    32-token prompt, against a control (the same step for a request whose adapter is in a
    slot), in pairs, medians reported. The copies' own device time inside the load steps is
    read from CUDA events around them: on a GPU they queue ahead of the step's kernels, so the
    load step's wall time can hide them behind the host's launches. Then the copy alone,
    repeated into one slot. Both steps run eagerly (a step with a prefill is no decode graph)."""
    engine = llm.engine
    running, pairs = max(1, cfg["max_seqs"] // 2), cfg["load_pairs"]
    rng = random.Random(2)
    prompts = [
        [rng.randrange(3, cfg["vocab"]) for _ in range(32)] for _ in range(running + 2 * pairs)
    ]
    ids = start_decoding(engine, prompts[:running], names[:running], max_tokens=64)
    in_slots = set(engine.slots.contents)
    outside = [n for n in names[running:] if engine.adapters[n].uid not in in_slots]
    if not outside:
        stop(engine, ids)
        print("load       every adapter is in a slot: nothing to measure")
        return
    before = timed_steps(engine, pairs)
    copies = []  # a callable per copy into a slot: its device seconds, once the step is done
    original = engine.pool.load_slot
    engine.pool.load_slot = _timed_copy(original, args.device, copies)
    loads, controls = [], []
    extra = iter(prompts[running:])
    try:
        for adapter in outside[-pairs:]:
            ids += start_decoding_one(engine, next(extra), adapter)
            count = engine.slots.loads
            for _ in range(5):  # the step that copies it in: the first, unless held back
                [t] = timed_steps(engine, 1)
                if engine.slots.loads > count:
                    loads.append(t)
                    break
            ids += start_decoding_one(engine, next(extra), names[0])  # its adapter decodes
            controls += timed_steps(engine, 1)
    finally:
        del engine.pool.load_slot  # the instance's own patch: the class's method again
    if not loads:
        stop(engine, ids)
        print("load       no step copied an adapter in: nothing to measure")
        return
    copy_in_step = statistics.median(seconds() for seconds in copies)
    uid = engine.adapters[outside[-1]].uid
    slot = engine.slots.slot_of[uid]
    copy = median_time(lambda: original(slot, uid), args.device, repeats=3)
    stop(engine, ids)
    base = statistics.median(before)
    load_step, control = statistics.median(loads), statistics.median(controls)
    size = slot_bytes(engine.pool)
    print(
        f"load       {len(loads)} steps with a host-to-slot adapter copy, median "
        f"{load_step * 1e3:.2f} ms against {control * 1e3:.2f} ms for the same step without "
        f"(the load costs {(load_step - control) * 1e3:.2f} ms of wall time; its copies "
        f"{copy_in_step * 1e3:.2f} ms of device time in the step) and {base * 1e3:.2f} ms for "
        f"{running} decodes; the copy alone {copy * 1e3:.2f} ms, {size / 1e6:.1f} MB "
        f"({size / copy / 1e9:.1f} GB/s)"
    )
    results["load"] = {
        "pairs": len(loads),
        "load_step_ms": load_step * 1e3,
        "control_step_ms": control * 1e3,
        "load_cost_ms": (load_step - control) * 1e3,
        "load_steps_ms": [t * 1e3 for t in loads],
        "control_steps_ms": [t * 1e3 for t in controls],
        "copy_in_step_device_ms": copy_in_step * 1e3,
        "median_decode_step_ms": base * 1e3,
        "copy_alone_ms": copy * 1e3,
        "slot_bytes": size,
    }


def slot_bytes(pool) -> int:
    """Bytes of one device slot: every module's padded A and B over the layers."""
    return sum(a[:, 0].nbytes + pool.B[m][:, 0].nbytes for m, a in pool.A.items())


def _timed_copy(load_slot, device, copies: list):
    """`load_slot` that records each call's device time: CUDA events on the stream it queues
    on (read once the step is done), or the host's seconds on a CPU."""
    import torch

    def timed(slot: int, uid: str) -> None:
        if torch.device(device).type != "cuda":
            t0 = time.perf_counter()
            load_slot(slot, uid)
            elapsed = time.perf_counter() - t0
            copies.append(lambda: elapsed)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        load_slot(slot, uid)
        end.record()

        def seconds() -> float:
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        copies.append(seconds)

    return timed


def start_decoding_one(engine, prompt, adapter) -> list[str]:
    from serve import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    return [engine.add_request(prompt, params, adapter)]

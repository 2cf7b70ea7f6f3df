"""How many bytes the paged KV cache gets: as configured, or what the GPU has left.

On CUDA, unless `kv_cache_memory_gb` is set, the pool takes what `gpu_memory_utilization` of
the GPU's memory leaves after everything else: what is in use once the weights and adapter slots
are loaded (this process's, the CUDA context's, any other process's), plus the activations of
the largest step the scheduler can plan, measured by running one (vLLM's profile run). The
headroom above `gpu_memory_utilization` holds what the profile cannot see: CUDA graphs'
memory pool and allocator fragmentation.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from registry.errors import UsageError
from serve.llama import ModelShape
from serve.sampling_params import SamplingParams
from serve.scheduler import SchedulerOutput
from serve.sequence import Sequence, Status

CPU_KV_CACHE_BYTES = 2**30  # on CPU the pool shares RAM with everything: a fixed default

_GiB = 2**30


def kv_block_bytes(shape: ModelShape, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block: K and V of `block_size` tokens in every layer."""
    return 2 * shape.num_layers * block_size * shape.num_kv_heads * shape.head_dim * dtype.itemsize


def worst_case_plan(
    max_num_batched_tokens: int,
    max_num_seqs: int,
    block_size: int,
    max_model_len: int,
    lora_slot: int,
) -> SchedulerOutput:
    """The step that needs the most activation memory: the whole token budget computed, as
    many sequences sampling as may run (all sampled with top-k/top-p and top logprobs), and the
    longest chunk scoring its prompt (logits for all its rows). The budget goes to as few
    chunks as the model's context allows (the scheduler admits prompts until it is spent), the
    other sequences decode one token. Every sequence is a fresh prompt of token 0 on
    `lora_slot`, with its own blocks numbered from 0."""
    num_seqs = min(max_num_seqs, max_num_batched_tokens)
    lengths, rest = [], max_num_batched_tokens
    for later in range(num_seqs - 1, -1, -1):  # sequences after this one, a token each
        lengths.append(min(max_model_len, rest - later))
        rest -= lengths[-1]
    seqs, next_block = [], 0
    for i, length in enumerate(lengths):
        params = SamplingParams(
            max_tokens=1,
            top_k=50,
            top_p=0.9,
            seed=0,  # its own generator: the engine's stream of draws stays untouched
            logprobs=20,
            prompt_logprobs=20 if i == 0 else None,
        )
        seq = Sequence(f"profile-{i}", [0] * length, length, params, status=Status.RUNNING)
        blocks = -(-length // block_size)
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        seqs.append(seq)
    return SchedulerOutput(
        seqs=seqs,
        num_new_tokens=[s.num_tokens for s in seqs],
        lora_slots=[lora_slot] * num_seqs,
    )


def blocks_of(plan: SchedulerOutput) -> int:
    return sum(len(s.block_table) for s in plan.seqs)


def kv_bytes_left(total: int, used: int, step_peak: int, utilization: float) -> int:
    """utilization · total − used − step_peak, refused when nothing is left.

    total: the GPU's memory; used: in use with no step running (weights, slots, context, other
    processes); step_peak: what the largest step allocates on top, freed after it."""
    left = int(utilization * total) - used - step_peak
    if left <= 0:
        raise UsageError(
            f"gpu_memory_utilization {utilization} of the GPU's {total / _GiB:.1f} GiB leaves "
            f"no room for the KV cache: {used / _GiB:.1f} GiB are in use (weights, adapter "
            f"slots, other processes) and the largest step needs {step_peak / _GiB:.1f} GiB. "
            "Raise gpu_memory_utilization, lower max_num_batched_tokens, max_num_seqs or "
            "max_loras, or set kv_cache_memory_gb"
        )
    return left


def measure_kv_bytes(device: torch.device, utilization: float, run_step: Callable[[], int]):
    """What the GPU has left for the KV cache once `run_step` (the largest step, over a
    scratch KV pool it frees) has shown its peak. `run_step` returns the scratch pool's bytes:
    they are KV, which the real pool holds, not the step's own memory."""
    gc.collect()  # an engine dropped before this one still holds its pool until collected
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    scratch_kv = run_step()
    torch.cuda.synchronize(device)
    step_peak = torch.cuda.max_memory_allocated(device) - before - scratch_kv
    torch.cuda.empty_cache()  # the step's freed blocks would count as used below
    free, total = torch.cuda.mem_get_info(device)
    return kv_bytes_left(total, total - free, step_peak, utilization)

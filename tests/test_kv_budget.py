"""Sizing the KV pool: the largest step the profile runs, what is left for the cache, and the
block counts the engine derives from its config."""

from __future__ import annotations

import pytest

from registry.errors import UsageError
from serve import LLM, SamplingParams
from serve.kv_budget import blocks_of, kv_bytes_left, worst_case_plan
from tests.helpers import tiny_engine_args

GiB = 2**30


@pytest.mark.parametrize(
    ("budget", "max_seqs", "block_size", "max_len", "lengths"),
    [
        (512, 32, 16, 8192, [481] + [1] * 31),  # a long chunk and 31 decodes
        (8, 32, 4, 8192, [1] * 8),  # fewer tokens than sequences: one each
        (100, 1, 16, 8192, [100]),  # a lone prefill
        (4096, 4, 16, 1000, [1000] * 4),  # no chunk past the model's context
        (64, 8, 4, 16, [16, 16, 16, 12, 1, 1, 1, 1]),  # the budget over chunks, then decodes
    ],
)
def test_worst_case_plan_spends_the_token_budget_over_the_most_sequences(
    budget, max_seqs, block_size, max_len, lengths
):
    plan = worst_case_plan(budget, max_seqs, block_size, max_len, lora_slot=3)
    assert plan.num_new_tokens == lengths
    assert [s.num_tokens for s in plan.seqs] == lengths  # fresh prompts: all of each computed
    assert plan.lora_slots == [3] * len(lengths)
    tables = [s.block_table for s in plan.seqs]
    assert [len(t) for t in tables] == [-(-n // block_size) for n in lengths]
    ids = [b for t in tables for b in t]
    assert ids == list(range(len(ids))) == list(range(blocks_of(plan)))
    # the longest chunk scores its prompt; every row samples through top-k/top-p on its own seed
    assert [s.params.prompt_logprobs for s in plan.seqs] == [20] + [None] * (len(lengths) - 1)
    assert all(s.params.seed is not None and not s.params.greedy for s in plan.seqs)


@pytest.mark.parametrize(
    ("budget", "max_seqs", "max_len", "prompt_len"),
    [(64, 8, 16, 15), (4096, 256, 1024, 1000), (512, 32, 8192, 100), (40, 4, 12, 3)],
)
def test_no_step_the_scheduler_plans_is_larger_than_the_profiled_one(
    budget, max_seqs, max_len, prompt_len
):
    """Waiting prompts, as many as may run: the scheduler admits them until the token
    budget is spent, so its first step is the largest; the profile must cover it."""
    from serve.block_allocator import BlockAllocator
    from serve.lora_slots import LoraSlots
    from serve.scheduler import Scheduler
    from serve.sequence import Sequence

    scheduler = Scheduler(BlockAllocator(100_000, 16), LoraSlots(1), max_seqs, budget)
    for i in range(2 * max_seqs):
        params = SamplingParams(max_tokens=1)
        prompt = [i + 1] * prompt_len
        scheduler.add(Sequence(f"r{i}", prompt, prompt_len, params, max_model_len=max_len))
    step = scheduler.schedule()
    profile = worst_case_plan(budget, max_seqs, 16, max_len, lora_slot=0)
    assert step.num_batched_tokens <= profile.num_batched_tokens
    assert len(step.seqs) <= len(profile.seqs)
    assert max(step.num_new_tokens) <= max(profile.num_new_tokens)


def test_kv_bytes_left_is_the_utilized_memory_less_what_is_in_use_and_the_step_peak():
    assert kv_bytes_left(80 * GiB, 6 * GiB, 2 * GiB, 0.9) == int(0.9 * 80 * GiB) - 8 * GiB
    assert kv_bytes_left(80 * GiB, 0, 0, 1.0) == 80 * GiB


def test_the_profiles_scratch_pool_is_kv_not_step_memory(monkeypatch):
    """The profile step writes K/V into a scratch pool: those bytes are what the real pool
    holds, so only the step's own peak (activations) is kept back from the KV budget."""
    import torch

    from serve.kv_budget import measure_kv_bytes

    gpu = {"allocated": 6 * GiB, "peak": 0}  # the weights

    def allocate(nbytes: int) -> None:
        gpu["allocated"] += nbytes
        gpu["peak"] = max(gpu["peak"], gpu["allocated"])

    def run_step() -> int:
        allocate(3 * GiB)  # the scratch pool
        allocate(GiB)  # the step's activations
        allocate(-4 * GiB)  # both freed
        return 3 * GiB

    fake = {
        "synchronize": lambda device=None: None,
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda device=None: gpu.update(peak=gpu["allocated"]),
        "memory_allocated": lambda device=None: gpu["allocated"],
        "max_memory_allocated": lambda device=None: gpu["peak"],
        "mem_get_info": lambda device=None: (80 * GiB - gpu["allocated"], 80 * GiB),
    }
    for name, function in fake.items():
        monkeypatch.setattr(torch.cuda, name, function)
    left = measure_kv_bytes(torch.device("cuda"), 0.9, run_step)
    assert left == int(0.9 * 80 * GiB) - 6 * GiB - GiB


def test_a_gpu_with_no_room_left_is_refused_naming_the_knobs():
    with pytest.raises(UsageError, match=r"gpu_memory_utilization 0\.5") as e:
        kv_bytes_left(80 * GiB, 38 * GiB, 2 * GiB, 0.5)
    assert "38.0 GiB are in use" in str(e.value)
    assert "kv_cache_memory_gb" in str(e.value)


def test_block_count_follows_the_configured_size_or_the_cpu_default(tiny_base):
    shape = LLM(**tiny_engine_args(tiny_base, num_kv_blocks=8)).engine.model.shape
    block_bytes = 2 * shape.num_layers * 4 * shape.num_kv_heads * shape.head_dim * 4  # fp32
    sized = LLM(**tiny_engine_args(tiny_base, num_kv_blocks=None, kv_cache_memory_gb=0.01))
    default = LLM(**tiny_engine_args(tiny_base, num_kv_blocks=None))
    assert sized.engine.num_blocks == int(0.01 * GiB) // block_bytes
    assert default.engine.num_blocks == GiB // block_bytes  # no GPU to measure: 1 GiB
    assert default.engine.runner.kv_cache.shape[2] == (default.engine.num_blocks + 1) * 4


def test_the_profile_step_leaves_the_engine_as_it_was(tiny_base):
    """The profile runs the largest step through the real runner and sampler; afterwards the
    engine samples exactly what a fresh one does (its stream of draws is untouched)."""
    prompts = ["the cat sat on", "a dog ran to the"]
    params = SamplingParams(max_tokens=8, temperature=1.0)
    args = tiny_engine_args(tiny_base, max_num_batched_tokens=64, max_num_seqs=8)
    expected = [o.token_ids for o in LLM(**args).generate(prompts, params)]

    llm = LLM(**args)
    engine = llm.engine
    scratch = engine._profile()
    assert engine.runner.kv_cache is None and not engine.sampler._seeded
    plan = worst_case_plan(64, 8, engine.config.block_size, engine.max_model_len, lora_slot=0)
    engine.runner.allocate_kv_cache(blocks_of(plan))
    assert scratch == engine.runner.kv_cache.nbytes  # its pool's bytes, for measure_kv_bytes
    engine.runner.allocate_kv_cache(engine.num_blocks)
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected

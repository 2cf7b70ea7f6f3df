"""The start-up warm-up's plans (`serve.warmup`): steps the scheduler could make, over the
scratch block alone. That they reach every kernel specialization is checked against a dense
sweep in `tests/kernel_variants.py`; that running them touches nothing, in test_kernels."""

from __future__ import annotations

import pytest

from serve.scheduler import BASE_SLOT
from serve.warmup import powers_of_two, warmup_plans


def test_powers_of_two_end_at_n_and_can_take_one_past_each():
    assert powers_of_two(1) == [1]
    assert powers_of_two(12) == [1, 2, 4, 8, 12]
    assert powers_of_two(16) == [1, 2, 4, 8, 16]
    assert powers_of_two(12, and_one_past=True) == [1, 2, 3, 4, 5, 8, 9, 12]
    assert powers_of_two(2, and_one_past=True) == [1, 2]


# (max_num_seqs, max_num_batched_tokens, max_model_len, max_loras): a GPU server, the CPU
# default, budgets below the sequence and adapter counts, a context of two tokens
CONFIGS = [(64, 2048, 8192, 64), (32, 512, 2048, 8), (32, 8, 128, 8), (12, 3, 40, 16), (1, 1, 2, 1)]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_warmup_plans_are_steps_the_scheduler_could_make_over_the_scratch_block(config):
    max_seqs, budget, max_len, max_loras = config
    block_size, scratch = 16, 1000
    plans = warmup_plans(max_seqs, budget, max_len, max_loras, block_size, scratch)
    assert plans
    for plan in plans:
        assert 1 <= len(plan.seqs) <= max_seqs
        assert 1 <= plan.num_batched_tokens <= budget
        slots = [s for s in plan.lora_slots if s != BASE_SLOT]
        assert len(set(slots)) <= max_loras and all(0 <= s < max_loras for s in slots)
        assert plan.lora_slots == sorted(plan.lora_slots)  # grouped by slot, base first
        assert not plan.lora_loads  # the slots are read as they are (zeros at start)
        for seq, new in zip(plan.seqs, plan.num_new_tokens, strict=True):
            assert 2 <= seq.num_tokens <= max_len
            assert seq.num_computed_tokens + new == seq.num_tokens  # each samples after it
            assert seq.block_table == [scratch] * -(-seq.num_tokens // block_size)
    # decodes at the longest context, and with adapters, are among them
    assert max(p.seqs[0].num_tokens for p in plans) == max_len
    assert any(s != BASE_SLOT for p in plans for s in p.lora_slots)

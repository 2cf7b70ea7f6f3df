"""Iteration-level scheduling with tiny budgets: chunked prefill, joining, preemption, slots."""

from __future__ import annotations

from serve.block_allocator import BlockAllocator
from serve.lora_slots import LoraSlots
from serve.sampling_params import SamplingParams
from serve.scheduler import BASE_SLOT, Scheduler
from serve.sequence import Sequence, Status


def make(num_blocks=16, block_size=4, max_num_seqs=4, budget=16, max_loras=2):
    return Scheduler(
        BlockAllocator(num_blocks, block_size), LoraSlots(max_loras), max_num_seqs, budget
    )


def seq(rid, n_prompt, adapter=None, max_tokens=8):
    start = 1000 * ord(rid)  # distinct prompts: no prefix-cache hits between requests
    return Sequence(
        rid,
        list(range(start, start + n_prompt)),
        n_prompt,
        SamplingParams(max_tokens=max_tokens),
        adapter_uid=adapter,
    )


def step(s: Scheduler, token=7):
    plan = s.schedule()
    sampled = [
        token if seq.num_computed_tokens + n == seq.num_tokens else None
        for seq, n in zip(plan.seqs, plan.num_new_tokens, strict=True)
    ]
    s.update(plan, sampled)
    return plan


def test_long_prompt_is_prefilled_in_chunks_then_decodes():
    s = make(budget=8)
    a = seq("a", 20)
    s.add(a)
    assert step(s).num_new_tokens == [8]
    assert step(s).num_new_tokens == [8]
    plan = step(s)
    assert plan.num_new_tokens == [4]
    assert a.num_output_tokens == 1  # sampled once the prompt was caught up
    assert step(s).num_new_tokens == [1]
    assert a.block_table == [0, 1, 2, 3, 4, 5]


def test_new_request_joins_while_others_decode_within_the_budget():
    s = make(budget=10)
    a = seq("a", 4)
    s.add(a)
    step(s)
    b = seq("b", 12)
    s.add(b)
    plan = step(s)
    assert [x.request_id for x in plan.seqs] == ["a", "b"]
    assert plan.num_new_tokens == [1, 9]  # a decodes, b prefills what the budget leaves
    plan = step(s)
    assert plan.num_new_tokens == [1, 3]


def test_running_sequences_are_capped():
    s = make(max_num_seqs=2)
    for rid in "abc":
        s.add(seq(rid, 2))
    plan = step(s)
    assert [x.request_id for x in plan.seqs] == ["a", "b"]
    assert [x.request_id for x in s.waiting] == ["c"]


def test_newest_sequence_is_preempted_and_resumes_with_its_tokens():
    s = make(num_blocks=4, block_size=4, budget=32)
    a, b = seq("a", 8, max_tokens=20), seq("b", 8, max_tokens=20)
    s.add(a)
    s.add(b)
    step(s)  # a: blocks 0,1, b: blocks 2,3; both full, both sample their 9th token
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    plan = step(s)  # a needs a 3rd block for position 8: b (newest) is preempted
    assert plan.preempted == [b]
    assert [x.request_id for x in plan.seqs] == ["a"]
    assert b.status is Status.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.num_tokens == 9  # its sampled token is kept
    assert s.waiting[0] is b
    a.params = SamplingParams(max_tokens=a.num_output_tokens + 1)  # let a finish next step
    step(s)
    assert a.is_finished
    plan = step(s)
    # b recomputes prompt and output. a took b's tail block 3 (evicted first); b's head block 2
    # was still cached, so 4 of its 9 tokens come from the prefix cache.
    assert plan.seqs == [b] and plan.num_new_tokens == [5]
    assert b.block_table[0] == 2
    # Its usage's cached prompt tokens are what its first admission found (none): a recompute
    # finding its own blocks again (output tokens too, past a longer run) is not a cache hit.
    assert b.num_cached_tokens == 0 and b.num_preemptions == 1
    # nor in the metrics: a's and b's first admissions looked up one block each, found none
    assert (s.prefix_query_blocks, s.prefix_hit_blocks) == (2, 0)


def test_prefix_cache_counts_a_request_once_however_long_it_waits_for_blocks():
    s = make(num_blocks=4, block_size=4, budget=32)
    a = Sequence("a", list(range(12)), 12, SamplingParams(max_tokens=3))
    s.add(a)
    step(s)  # a: blocks 0-2; its prompt's blocks are cached
    b = Sequence("b", [*range(8), *range(100, 108)], 16, SamplingParams(max_tokens=3))
    s.add(b)
    while not a.is_finished:  # b finds two of its blocks in a's, no room for the other two
        assert b not in step(s).seqs
    assert step(s).seqs == [b]
    assert b.num_cached_tokens == 8
    # a looked up (12 - 1) // 4 = 2 blocks, b (16 - 1) // 4 = 3 and found 2, once each
    assert (s.prefix_query_blocks, s.prefix_hit_blocks) == (5, 2)


def test_distinct_adapters_per_step_are_capped_at_the_slots():
    s = make(max_loras=2, budget=64, max_num_seqs=8)
    for rid, adapter in [("a", "x/1"), ("b", "y/1"), ("c", "z/1"), ("d", None), ("e", "x/1")]:
        s.add(seq(rid, 2, adapter))
    plan = step(s)
    ids = [x.request_id for x in plan.seqs]
    assert sorted(ids) == ["a", "b", "d", "e"]  # z waits for a slot; others pass it
    assert ids[0] == "d" and plan.lora_slots[0] == BASE_SLOT  # base first, then by slot
    assert plan.lora_slots == sorted(plan.lora_slots)
    assert sorted(plan.lora_loads) == [(0, "x/1"), (1, "y/1")]
    assert [x.request_id for x in s.waiting] == ["c"]


def test_a_request_waiting_for_a_slot_is_not_starved_by_requests_for_loaded_adapters():
    s = make(num_blocks=64, max_loras=1, budget=64, max_num_seqs=4)
    s.max_slot_passes = 3
    s.add(seq("a", 2, "x/1", max_tokens=4))
    step(s)
    s.add(seq("b", 2, "y/1", max_tokens=2))
    admitted = []
    for rid in "cdefghijklmn":  # a new request for the loaded adapter every step
        s.add(seq(rid, 2, "x/1", max_tokens=4))
        plan = step(s)
        admitted += [x.request_id for x in plan.seqs if x.num_computed_tokens == 2]
        if "b" in admitted:
            break
    # passed three times; then the x requests wait, x's slot drains (4-token outputs) to it
    assert admitted == ["c", "d", "e", "b"]
    assert [x.request_id for x in s.waiting][:3] == ["f", "g", "h"]


def test_a_starving_request_drains_one_slot_while_the_others_keep_serving():
    s = make(num_blocks=64, max_loras=2, budget=64, max_num_seqs=8)
    s.max_slot_passes = 2
    s.add(seq("a", 2, "x/1", max_tokens=20))
    s.add(seq("c", 2, "z/1", max_tokens=3))
    step(s)
    s.add(seq("b", 2, "y/1", max_tokens=2))
    admitted = []  # per step, the sequences that joined
    for rid, adapter in zip("defgh", ["x/1", "z/1"] * 3, strict=False):
        s.add(seq(rid, 2, adapter, max_tokens=3))
        plan = step(s)
        admitted.append(sorted(x.request_id for x in plan.seqs if x.num_computed_tokens == 2))
    # d (x) and e (z) pass b twice; then z, with one running sequence against x's two, drains:
    # f (x) still joins, g (z) waits, and b takes z's slot once e's three tokens are out
    assert admitted == [["d"], ["e"], ["f"], [], ["b", "h"]]
    assert s.slots.slot_of["y/1"] == 1 and [x.request_id for x in s.waiting] == ["g"]


def test_adapter_slot_is_reused_after_its_sequences_finish():
    s = make(max_loras=1, budget=64)
    s.add(seq("a", 2, "x/1", max_tokens=1))
    s.add(seq("b", 2, "y/1", max_tokens=1))
    assert step(s).lora_loads == [(0, "x/1")]
    plan = step(s)
    assert plan.lora_loads == [(0, "y/1")] and s.slots.evictions == 1


def test_slot_assigned_to_a_request_that_could_not_start_is_filled_when_it_does():
    s = make(num_blocks=2, block_size=4, max_loras=1, budget=64)
    s.add(seq("r", 8, max_tokens=1))  # takes both blocks, finishes after one step
    s.add(seq("b", 2, "y/1"))
    plan = step(s)
    assert [x.request_id for x in plan.seqs] == ["r"] and plan.lora_loads == []
    plan = step(s)
    assert [x.request_id for x in plan.seqs] == ["b"]
    assert plan.lora_loads == [(0, "y/1")]


def test_abort_frees_blocks_of_running_and_waiting_sequences():
    s = make(max_num_seqs=1)
    a, b = seq("a", 5), seq("b", 5)
    s.add(a)
    s.add(b)
    step(s)
    s.finish(a, Status.FINISHED_ABORTED)
    s.finish(b, Status.FINISHED_ABORTED)
    assert s.allocator.num_free_blocks == 16
    assert not s.has_unfinished

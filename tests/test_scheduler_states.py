"""The scheduler, block allocator and adapter slots under random interleavings (hypothesis).

A fake runner keeps what the K/V pool would hold: at each slot, the (adapter, token,
position) whose K/V was written there. Every step checks that each sequence reads exactly its
own prefix through its block table (so prefix caching, preemption and block reuse never hand
it another sequence's K/V, or the same tokens under another adapter) and writes only blocks
no one else holds. After every rule the bookkeeping must agree with itself, and once requests
stop arriving every one of them finishes and every block and slot is released.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from serve.block_allocator import BlockAllocator
from serve.lora_slots import LoraSlots
from serve.sampling_params import SamplingParams
from serve.scheduler import BASE_SLOT, Scheduler
from serve.sequence import Sequence, Status

NUM_BLOCKS, BLOCK_SIZE = 12, 4
MAX_MODEL_LEN = NUM_BLOCKS * BLOCK_SIZE  # a lone sequence always fits, as the engine ensures
MAX_SEQS, BUDGET, MAX_LORAS = 4, 10, 2
ADAPTERS = [None, "a/1", "b/1", "c/1"]
# Shared prompt starts, for prefix-cache hits across requests: one block shared by two, two
# whole blocks (the whole prompt, without a tail), three and a bit.
PREFIXES = [[], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9, 9, 9, 9], [5] * 8, [7] * 13]
REQUESTS = st.tuples(
    st.builds(
        lambda prefix, tail: (prefix + tail)[: MAX_MODEL_LEN - 1] or [0],
        st.sampled_from(PREFIXES),
        st.just([]) | st.lists(st.integers(0, 9), max_size=16),
    ),
    st.sampled_from(ADAPTERS),
    st.integers(1, 12),  # max_tokens
    st.integers(0, 4).map(lambda x: x == 0),  # asks for prompt logprobs: no prefix reuse
)


def sampled_token(seq: Sequence) -> int:
    """What the fake model samples: a function of the sequence's tokens so far (and not of
    the process, as `hash` of a string is), so equal requests produce equal blocks."""
    return (sum(seq.token_ids) + 3 * seq.num_tokens + len(seq.adapter_uid or "")) % 11


class SchedulerStates(RuleBasedStateMachine):
    @initialize(max_slot_passes=st.integers(1, 4), prefix_caching=st.booleans())
    def start(self, max_slot_passes, prefix_caching):
        allocator = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE, prefix_caching)
        self.scheduler = Scheduler(allocator, LoraSlots(MAX_LORAS), MAX_SEQS, BUDGET)
        self.scheduler.max_slot_passes = max_slot_passes
        self.kv: dict[int, tuple[str | None, int, int]] = {}  # pool slot -> (adapter, token, pos)
        self.live: dict[str, Sequence] = {}  # unfinished requests
        self.ids = itertools.count()

    @rule(requests=st.lists(REQUESTS, min_size=1, max_size=4))
    def add(self, requests):
        for prompt, adapter, max_tokens, prompt_logprobs in requests:
            params = SamplingParams(
                max_tokens=max_tokens, prompt_logprobs=1 if prompt_logprobs else None
            )
            seq = Sequence(
                f"r{next(self.ids)}",
                prompt,
                len(prompt),
                params,
                adapter_uid=adapter,
                max_model_len=MAX_MODEL_LEN,
            )
            self.live[seq.request_id] = seq
            self.scheduler.add(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        seq = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.scheduler.finish(seq, Status.FINISHED_ABORTED)

    @rule(uid=st.sampled_from(ADAPTERS[1:]))
    def unload_adapter(self, uid):
        self.scheduler.slots.forget(uid)  # what the engine does when an adapter is unloaded

    @rule(steps=st.integers(1, 4), data=st.data())
    def step(self, steps, data):
        for _ in range(steps):
            self._step()
        running = [s for s in self.scheduler.running if s.num_output_tokens]
        if running and data.draw(st.booleans()):  # a stop string, or guided JSON completed
            self._finish(data.draw(st.sampled_from(running)), Status.FINISHED_STOPPED)

    def _finish(self, seq: Sequence, status: Status) -> None:
        self.scheduler.finish(seq, status)
        del self.live[seq.request_id]

    def _step(self) -> int:
        """One engine step; returns how many tokens it sampled."""
        s = self.scheduler
        plan = s.schedule()
        self._check_plan(plan)
        sampled = []
        for seq, n in zip(plan.seqs, plan.num_new_tokens, strict=True):
            self._run(seq, n)
            caught_up = seq.num_computed_tokens + n == seq.num_tokens
            sampled.append(sampled_token(seq) if caught_up else None)
        for seq in s.update(plan, sampled):
            del self.live[seq.request_id]
        return len(sampled) - sampled.count(None)

    def _check_plan(self, plan) -> None:
        s = self.scheduler
        assert plan.num_batched_tokens <= BUDGET
        assert len(plan.seqs) == len(set(map(id, plan.seqs))) <= MAX_SEQS
        assert all(n >= 1 for n in plan.num_new_tokens)
        assert plan.lora_slots == sorted(plan.lora_slots), "the batch is grouped by slot"
        uids = {seq.adapter_uid for seq in plan.seqs} - {None}
        assert len(uids) <= MAX_LORAS
        for seq, slot in zip(plan.seqs, plan.lora_slots, strict=True):
            assert seq.status is Status.RUNNING
            if seq.adapter_uid is None:
                assert slot == BASE_SLOT
            else:  # its slot holds its weights once the plan's loads are done
                assert s.slots.contents[slot] == seq.adapter_uid
        loaded = [slot for slot, _ in plan.lora_loads]
        assert len(loaded) == len(set(loaded))
        for seq in plan.preempted:
            assert seq.status is Status.WAITING and not seq.block_table

    def _run(self, seq: Sequence, n: int) -> None:
        """The fake forward pass of `n` tokens of `seq`: read its cached prefix, write its new
        tokens' K/V."""
        allocator = self.scheduler.allocator
        start = seq.num_computed_tokens
        assert len(seq.block_table) * BLOCK_SIZE >= start + n
        for pos in range(start):
            slot = self._slot(seq, pos)
            assert self.kv.get(slot) == (seq.adapter_uid, seq.token_ids[pos], pos), (
                f"{seq.request_id} reads position {pos} from slot {slot}: {self.kv.get(slot)}"
            )
        for pos in range(start, start + n):
            block = seq.block_table[pos // BLOCK_SIZE]
            assert allocator.ref_counts[block] == 1, f"block {block} is shared but written"
            self.kv[self._slot(seq, pos)] = (seq.adapter_uid, seq.token_ids[pos], pos)

    @staticmethod
    def _slot(seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE

    @invariant()
    def bookkeeping_agrees(self):
        s = self.scheduler
        a, slots = s.allocator, s.slots
        running, waiting = s.running, list(s.waiting)
        assert {q.request_id for q in running + waiting} == set(self.live)
        assert len(running) + len(waiting) == len(self.live)
        assert all(q.status is Status.RUNNING for q in running)
        assert all(q.status is Status.WAITING and not q.block_table for q in waiting)
        assert len(running) <= MAX_SEQS
        holders = [0] * NUM_BLOCKS
        for q in running:
            assert len(q.block_table) == len(set(q.block_table))
            for block in q.block_table:
                holders[block] += 1
        assert a.ref_counts == holders
        assert set(a.free_blocks) == {b for b in range(NUM_BLOCKS) if holders[b] == 0}
        for h, block in a.cached.items():
            assert a.block_hash[block] == h
        uses = {}
        for q in running:
            if q.adapter_uid is not None:
                uses[q.adapter_uid] = uses.get(q.adapter_uid, 0) + 1
        assert dict(slots.pins) == uses
        assert all(uid in slots.slot_of for uid in uses)
        assert len(set(slots.slot_of.values())) == len(slots.slot_of) <= MAX_LORAS

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        # No more arrivals: everything finishes. A prompt prefills within MAX_MODEL_LEN steps,
        # so that many steps in a row without a sampled token is a livelock.
        idle = 0
        while self.scheduler.has_unfinished:
            idle = 0 if self._step() else idle + 1
            self.bookkeeping_agrees()
            assert idle < MAX_MODEL_LEN, "no sequence samples a token any more"
        assert not self.live
        assert self.scheduler.allocator.num_free_blocks == NUM_BLOCKS
        assert not self.scheduler.slots.pins


SchedulerStates.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_scheduler_keeps_kv_and_bookkeeping_right_under_random_interleavings = SchedulerStates.TestCase

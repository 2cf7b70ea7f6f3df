"""Iteration-level scheduling: which sequences compute how many tokens in the next step.

Each step has a token budget. Running sequences go first, oldest first: a decoding sequence
takes one token, one still prefilling takes a chunk of its prompt. Waiting sequences then join
in arrival order while budget, sequence slots, KV blocks and adapter slots last; one whose
adapter finds no slot lets later ones pass, but at most MAX_SLOT_PASSES. When blocks run
out, the newest running sequence is preempted: its blocks are freed and it waits at the head of
the queue to be recomputed, keeping every token it has generated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serve.block_allocator import BlockAllocator
from serve.lora_slots import LoraSlots
from serve.sequence import Sequence, Status

BASE_SLOT = -1  # the lora slot of sequences served by the base model alone
# Later sequences that may take a slot ahead of one waiting for its adapter's slot. Past that
# the slot of the loaded adapter with the fewest running sequences takes no newcomer until it
# drains to the waiting one: a stream of requests for loaded adapters cannot starve another
# adapter, and the other slots keep serving theirs. A queue that only drains (a batch of
# requests) never gets there, so it keeps the throughput of grouping requests by adapter.
MAX_SLOT_PASSES = 256


@dataclass
class SchedulerOutput:
    """The plan of one step, in batch order: base-only sequences first, then grouped by slot."""

    seqs: list[Sequence] = field(default_factory=list)
    # tokens each sequence computes, from position seq.num_computed_tokens on; [len(seqs)]
    num_new_tokens: list[int] = field(default_factory=list)
    # device lora slot of each sequence, BASE_SLOT for none; [len(seqs)]
    lora_slots: list[int] = field(default_factory=list)
    # adapters to copy into device slots before the step runs: (slot, adapter uid)
    lora_loads: list[tuple[int, str]] = field(default_factory=list)
    # sequences sent back to the waiting queue this step (their blocks are already freed)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        slots: LoraSlots,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ):
        self.allocator = allocator
        self.slots = slots
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_slot_passes = MAX_SLOT_PASSES
        self.draining: str | None = None  # adapter whose slot takes no newcomer (see above)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_query_blocks = 0  # prompt blocks looked up in the prefix cache, for metrics
        self.prefix_hit_blocks = 0  # and found there

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        plan, preempted, budget = self._continue_running(budget)
        loads: list[tuple[int, str]] = []
        if not preempted:  # newcomers would only be preempted next
            loads = self._admit_waiting(plan, budget)
        loads += self.slots.refill()
        plan.sort(key=lambda item: self._slot(item[0]))
        return SchedulerOutput(
            seqs=[seq for seq, _ in plan],
            num_new_tokens=[n for _, n in plan],
            lora_slots=[self._slot(seq) for seq, _ in plan],
            lora_loads=loads,
            preempted=preempted,
        )

    def _continue_running(self, budget: int):
        """Running sequences, oldest first; the newest is preempted while blocks run out."""
        plan: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        running = list(self.running)
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            # Victims come from the end, newest first, never from the plan built so far
            # (running[:i]): the last one popped can be seq itself, which then waits.
            while not self.allocator.can_append(seq, n):
                victim = running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.allocator.append(seq, n)
                plan.append((seq, n))
                budget -= n
                i += 1
        self.running = running
        return plan, preempted, budget

    def _admit_waiting(self, plan: list[tuple[Sequence, int]], budget: int):
        """Waiting sequences in arrival order while budget, slots and blocks last; a sequence
        whose adapter finds no free slot lets the others pass, up to `max_slot_passes` of
        them. Returns the slot loads."""
        loads: list[tuple[int, str]] = []
        skipped: list[Sequence] = []  # waiting for a slot, passed by who takes one
        starving = False  # one of them has been passed max_slot_passes times
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            slot = None
            if seq.adapter_uid is not None:
                blocked = starving and seq.adapter_uid == self.draining
                slot = None if blocked else self.slots.acquire(seq.adapter_uid)
                if slot is None:
                    if not starving and seq.num_passed >= self.max_slot_passes:
                        starving = True
                        self._drain_a_slot()
                    skipped.append(self.waiting.popleft())
                    continue
            self.allocator.match_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.allocator.can_append(seq, n):
                self._free(seq)
                break
            if slot is not None:
                for passed in skipped:
                    passed.num_passed += 1
                if self.slots.fill(seq.adapter_uid):
                    loads.append((slot, seq.adapter_uid))
            self.allocator.append(seq, n)
            if not seq.num_preemptions:  # a recompute finds its own blocks: not the prompt's
                self._count_prefix_hit(seq)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        if not starving:
            self.draining = None
        return loads

    def _count_prefix_hit(self, seq: Sequence) -> None:
        """Once per request, when admitted: a lookup that finds no room is retried the next
        step, and counting each try would inflate both counts."""
        seq.num_cached_tokens = seq.num_computed_tokens
        self.prefix_query_blocks += self.allocator.cacheable_blocks(seq)
        self.prefix_hit_blocks += seq.num_computed_tokens // self.allocator.block_size

    def _drain_a_slot(self) -> None:
        """Keep draining the same slot while it has running sequences; else pick the one
        with the fewest, the soonest free."""
        if self.draining not in self.slots.pins:
            self.draining = min(self.slots.pins, key=self.slots.pins.get, default=None)

    def update(self, plan: SchedulerOutput, sampled: list[int | None]) -> list[Sequence]:
        """Apply a step's result: computed tokens and one sampled token per sequence that had
        caught up (None for the rest). Returns the sequences that finished."""
        finished = []
        for seq, n, token in zip(plan.seqs, plan.num_new_tokens, sampled, strict=True):
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens += n
            self.allocator.commit(seq, n)
            if token is not None:
                seq.append_token(token)
                if seq.is_finished:
                    self._release(seq)
                    finished.append(seq)
        return finished

    def finish(self, seq: Sequence, status: Status) -> None:
        """End a sequence from outside the step (abort, stop string, its own output failed). A
        stop string found in the token that also reached the length limit is why it ended."""
        if seq.is_finished:
            if seq.status is Status.FINISHED_LENGTH and status is Status.FINISHED_STOPPED:
                seq.status = status
            return
        was_running = seq.status is Status.RUNNING
        seq.status = status
        if was_running:
            self._release(seq)
        else:
            self.waiting.remove(seq)
            self.allocator.free(seq)

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        """Give back its blocks and its pin on its adapter's slot."""
        self.allocator.free(seq)
        if seq.adapter_uid is not None:
            self.slots.release(seq.adapter_uid)

    def _slot(self, seq: Sequence) -> int:
        return BASE_SLOT if seq.adapter_uid is None else self.slots.slot_of[seq.adapter_uid]

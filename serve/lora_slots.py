"""Which adapter sits in which of the `max_loras` device slots (bookkeeping only, no tensors).

A slot is pinned while a running sequence uses its adapter; an unpinned slot is reused least
recently used first. So the distinct adapters of one step never exceed the slots. Assignment
and contents are kept apart: a slot is assigned when a sequence asks for it, but filled only
by a plan that runs a sequence of that adapter.
"""

from __future__ import annotations

from collections import Counter, OrderedDict


class LoraSlots:
    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self.slot_of: dict[str, int] = {}  # adapter uid -> slot
        self.pins: Counter[str] = Counter()  # adapter uid -> running sequences using it
        self._idle: OrderedDict[str, None] = OrderedDict()  # unpinned uids, LRU first
        self.contents: list[str | None] = [None] * max_loras  # uid whose weights fill each slot
        self.loads = 0  # adapters copied into a slot, for metrics
        self.hits = 0  # admissions whose adapter was already in its slot
        self.evictions = 0

    def acquire(self, uid: str) -> int | None:
        """Pin `uid` to a slot, or None if every slot is pinned by other adapters."""
        if uid in self.slot_of:
            self._idle.pop(uid, None)
            self.pins[uid] += 1
            return self.slot_of[uid]
        used = set(self.slot_of.values())
        free = [s for s in range(self.max_loras) if s not in used]
        if free:
            slot = free[0]
        elif self._idle:
            victim, _ = self._idle.popitem(last=False)
            slot = self.slot_of.pop(victim)
            self.evictions += 1
        else:
            return None
        self.slot_of[uid] = slot
        self.pins[uid] += 1
        return slot

    def fill(self, uid: str) -> bool:
        """Whether the plan that runs `uid` must first copy its weights into its slot. The
        slot counts as holding them from now: the copy is the plan's first act on the device,
        and a launch that fails before it is done takes the claim back (`unfill`)."""
        slot = self.slot_of[uid]
        if self.contents[slot] == uid:
            self.hits += 1
            return False
        self.contents[slot] = uid
        self.loads += 1
        return True

    def refill(self) -> list[tuple[int, str]]:
        """(slot, uid) copies for pinned adapters whose slot lost its weights: a step that
        failed before its copies took their claims back (`unfill`), and a sequence it
        admitted, still running, would otherwise decode with what the slot held before."""
        lost = [uid for uid in self.pins if self.contents[self.slot_of[uid]] != uid]
        return [(self.slot_of[uid], uid) for uid in lost if self.fill(uid)]

    def unfill(self, slots) -> None:
        """The copies into `slots` that `fill` asked for did not happen (the step failed)."""
        for slot in slots:
            self.contents[slot] = None

    def release(self, uid: str) -> None:
        self.pins[uid] -= 1
        if self.pins[uid] == 0:
            del self.pins[uid]
            self._idle[uid] = None

    def forget(self, uid: str) -> None:
        """Drop an unloaded adapter's slot, so a new version under the same name loads afresh."""
        if uid not in self.pins and uid in self.slot_of:
            del self.slot_of[uid]
            self._idle.pop(uid, None)

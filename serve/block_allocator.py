"""Paged KV cache bookkeeping: fixed-size blocks, reference counts and the prefix cache.

Block ids index the preallocated K/V pool of the model runner; this class never touches
tensors. A full block is hashed by (parent block hash, adapter uid, its tokens): a later
sequence with the same adapter version and the same prefix reuses it instead of recomputing.
Freed blocks keep their contents and hash until they are handed out again, least recently
used first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from serve.sequence import Sequence


def block_hashes(
    tokens: list[int], block_size: int, adapter_uid: str | None, start: list[bytes]
) -> list[bytes]:
    """Chained hashes of every full block of `tokens`, continuing the already known `start`.

    A cryptographic digest, not Python's `hash`: ints hash to themselves, so a client could
    craft a prompt whose blocks collide with another's cached prefix and be served from its
    K/V (vLLM's CVE-2025-25183)."""
    hashes = list(start)
    # Each input is a 16-byte parent and the block's int64s: no two inputs read alike.
    parent = hashes[-1] if hashes else _digest(repr(adapter_uid).encode())
    for i in range(len(hashes), len(tokens) // block_size):
        block = array("q", tokens[i * block_size : (i + 1) * block_size])
        parent = _digest(parent + block.tobytes())
        hashes.append(parent)
    return hashes


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hashes: dict[str, list[bytes]] = {}  # request id -> hashes of its full blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` the blocks to hold `num_new_tokens` more tokens (ask can_append first)."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            block, _ = self.free_blocks.popitem(last=False)
            self._forget(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def cacheable_blocks(self, seq: Sequence) -> int:
        """The full blocks of `seq` a prefix lookup considers: those before its last token,
        whose logits are needed to sample. None without caching or with prompt logprobs,
        which need every prompt position computed."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0
        return (seq.num_tokens - 1) // self.block_size

    def match_prefix(self, seq: Sequence) -> int:
        """Take the cached blocks that hold a prefix of `seq` (of its `cacheable_blocks`);
        returns the tokens they cover."""
        usable = 0 if seq.block_table else self.cacheable_blocks(seq)
        if not usable:
            return 0
        for h in self._hashes_of(seq)[:usable]:
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def commit(self, seq: Sequence, num_new_tokens: int) -> None:
        """Publish the blocks the step's `num_new_tokens` of `seq` completed, for other
        sequences to reuse. Only those: the ones before were published by earlier steps or
        came from the cache, and walking them all again would cost each step O(context)."""
        if not self.enable_prefix_caching:
            return
        first = (seq.num_computed_tokens - num_new_tokens) // self.block_size
        full = seq.num_computed_tokens // self.block_size
        hashes = self._hashes_of(seq)
        for i in range(first, full):
            block = seq.block_table[i]
            if self.block_hash[block] is None and hashes[i] not in self.cached:
                self.block_hash[block] = hashes[i]
                self.cached[hashes[i]] = block

    def free(self, seq: Sequence) -> None:
        """Release the blocks of a finished or preempted sequence.

        Tail blocks go first into the eviction order, so a shared prefix outlives them;
        blocks that hold no cached prefix are reused before any that do.
        """
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.block_hash[block] is None:
                    self.free_blocks.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._hashes.pop(seq.request_id, None)

    def _hashes_of(self, seq: Sequence) -> list[bytes]:
        known = self._hashes.get(seq.request_id, [])
        if len(known) < seq.num_tokens // self.block_size:
            known = block_hashes(seq.token_ids, self.block_size, seq.adapter_uid, known)
            self._hashes[seq.request_id] = known
        return known

    def _forget(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hash[block] = None

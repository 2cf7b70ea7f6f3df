"""Grammar-constrained decoding: which tokens keep each guided request's output inside its schema.

llguidance compiles a schema once per engine (cached by schema text) and, each step, fills a
bitmask of the tokens allowed next for every guided row of the batch; rows without a
`response_format` are never touched. A request's grammar state follows its output tokens: it
catches up with `seq.output_token_ids` before each use, so a preempted sequence that is
recomputed (keeping its tokens) resumes exactly where it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from registry.errors import UsageError
from serve.response_format import FIELD, ResponseFormat, grammar
from serve.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class GuidedMasks:
    """The next tokens guided sequences may take: token t is allowed for request r when bit
    t % 32 of bitmask[row[r], t // 32] is set."""

    row: dict[str, int]  # request id -> its row of bitmask
    bitmask: np.ndarray  # [guided sequences, words] int32


class _Matcher:
    """One request's grammar state and how many of its output tokens it has consumed."""

    def __init__(self, matcher):
        self.matcher = matcher  # llguidance.LLMatcher
        self.consumed = 0

    def catch_up(self, seq: Sequence) -> None:
        new = seq.output_token_ids[self.consumed :]
        if new:
            # Tokens were drawn under this grammar's mask, so they always fit; a failure leaves
            # the matcher stopped, which ends the request instead of the engine.
            if not self.matcher.consume_tokens(new):
                log.warning("%s: grammar refused a token: %s", seq.request_id, self.error)
            self.consumed += len(new)

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class GuidedDecoding:
    """The engine's grammars: compiled per schema, one state per guided request."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int]):
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size  # logits width
        self.eos_token_ids = sorted(eos_token_ids)
        self._matchers: dict[str, _Matcher] = {}  # request id -> its grammar state
        self._template = lru_cache(maxsize=64)(self._new_template)  # schema -> fresh matcher

    @cached_property
    def tokenizer(self):
        """llguidance's view of the vocabulary (≈0.4 s): built on the first guided request."""
        import llguidance.hf

        n_vocab = max(self.vocab_size, len(self.hf_tokenizer))
        return llguidance.hf.from_tokenizer(
            self.hf_tokenizer, n_vocab=n_vocab, eos_token=self.eos_token_ids
        )

    def start(self, request_id: str, fmt: ResponseFormat) -> None:
        """Give a request the grammar of `fmt`; UsageError naming the field when it cannot be."""
        self._matchers[request_id] = _Matcher(self._template(fmt.json_schema).deep_copy())

    def forget(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def finished(self, seq: Sequence) -> bool:
        """The grammar is complete (or broken): nothing but EOS may follow, so the request ends."""
        state = self._matchers.get(seq.request_id)
        if state is None:
            return False
        state.catch_up(seq)
        return state.matcher.is_stopped()

    def masks(self, seqs: list[Sequence]) -> GuidedMasks | None:
        """The tokens each guided sequence of `seqs` may take next, on the host (the runner
        asks while the device computes the forward pass); None when none is guided. A row
        takes llguidance 2-10 µs; its threaded fill gained under 1.5x here, on 2 cores."""
        from llguidance.numpy import fill_next_token_bitmask

        guided = [s for s in seqs if s.request_id in self._matchers]
        if not guided:
            return None
        words = (self.tokenizer.vocab_size + 31) // 32
        bitmask = np.empty((len(guided), words), dtype=np.int32)
        for j, seq in enumerate(guided):
            state = self._matchers[seq.request_id]
            state.catch_up(seq)
            fill_next_token_bitmask(state.matcher, bitmask, j)
        return GuidedMasks({seq.request_id: j for j, seq in enumerate(guided)}, bitmask)

    def mask_(self, logits: torch.Tensor, seqs: list[Sequence], masks: GuidedMasks) -> None:
        """logits[i, t] = -inf where row i is guided and its grammar forbids token t next.

        logits: [rows, vocab], one row per sequence, changed in place; unguided rows are not
        read or written. `masks` may hold sequences no longer sampled (ended meanwhile).
        """
        pairs = [
            (i, masks.row[s.request_id]) for i, s in enumerate(seqs) if s.request_id in masks.row
        ]
        if not pairs:
            return
        rows, picks = (list(x) for x in zip(*pairs, strict=True))
        bitmask = masks.bitmask if len(picks) == len(masks.row) else masks.bitmask[picks]
        forbidden = ~unpack_bitmask(bitmask, logits.shape[1], logits.device)  # [guided, vocab]
        # The batch at once: a launch per guided row would cost a GPU more than the passes.
        if len(rows) == len(seqs):
            logits.masked_fill_(forbidden, float("-inf"))
        else:
            index = torch.tensor(rows, device=logits.device)
            guided = logits.index_select(0, index).masked_fill_(forbidden, float("-inf"))
            logits.index_copy_(0, index, guided)

    def _new_template(self, json_schema: str):
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, grammar(json_schema), log_level=0)
        if matcher.is_error():
            raise UsageError(f"{FIELD} cannot be enforced: {matcher.get_error()}")
        return matcher


def unpack_bitmask(bitmask: np.ndarray, vocab: int, device="cpu") -> torch.Tensor:
    """allowed[r, t] = bit (t mod 32) of bitmask[r, t // 32]. bitmask: [rows, words] int32;
    returns [rows, vocab] bool on `device` (tokens past the bitmask's end are not allowed).

    Off the CPU the packed bytes are copied (an eighth of the bools) and unpacked there; on
    it numpy unpacks, 4x faster than torch's ops."""
    # Little-endian words: byte k of a row holds tokens 8k .. 8k+7, lowest bit first.
    little = bitmask.astype("<i4", copy=False).view(np.uint8)
    if torch.device(device).type == "cpu":
        bits = torch.from_numpy(np.unpackbits(little, axis=1, bitorder="little"))
    else:
        bits = unpack_bits(torch.from_numpy(little).to(device))
    allowed = bits[:, :vocab].view(torch.bool)
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    return allowed


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """bits[r, 8k + i] = bit i of packed[r, k]: numpy's `unpackbits(bitorder="little")` on
    any device. packed: [rows, n] uint8; returns [rows, 8n] uint8 of 0 and 1."""
    values = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device)
    return (packed[:, :, None] & values).ne(0).view(torch.uint8).view(packed.shape[0], -1)

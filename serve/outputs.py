"""What callers see of a request: text decoded incrementally, stop strings, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from serve.sampler import TokenLogprobs
from serve.sequence import Sequence


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str  # all output text so far (stop string removed unless asked)
    token_ids: list[int]  # all output tokens so far
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort" once finished
    adapter: str | None
    delta_text: str = ""  # new since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # per output token, when asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # per prompt token (first: None)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None


class RequestState:
    """Incremental detokenization and stop-string search of one request."""

    def __init__(self, seq: Sequence, tokenizer):
        self.seq = seq
        self.tokenizer = tokenizer
        self.text = ""
        self.emitted_tokens = 0
        self.emitted_text = 0
        self.logprobs: list[TokenLogprobs] | None = [] if seq.params.logprobs is not None else None
        wanted = seq.params.prompt_logprobs is not None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = [None] if wanted else None
        self.first_token_time: float | None = None
        self.stopped_by_string = False

    def update(
        self, new_logprobs: TokenLogprobs | None, prompt_logprobs: list[tuple[int, TokenLogprobs]]
    ) -> None:
        """Take this step's results; may end the sequence on a stop string."""
        if self.prompt_logprobs is not None:
            for position, lp in prompt_logprobs:
                if position == len(self.prompt_logprobs):  # recomputation repeats none
                    self.prompt_logprobs.append(lp)
        if new_logprobs is not None and self.logprobs is not None:
            self.logprobs.append(new_logprobs)
        seq = self.seq
        if seq.num_output_tokens and self.first_token_time is None:
            self.first_token_time = time.monotonic()
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not seq.is_finished:
            return  # half of a multi-byte character: wait for the rest
        self.text = text
        stops = seq.params.stop
        if stops and not self.stopped_by_string:
            window = max(len(s) for s in stops)
            search_from = max(0, self.emitted_text - window)
            hits = [(self.text.find(s, search_from), s) for s in stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                index, stop = min(hits)
                end = index + len(stop) if seq.params.include_stop_str_in_output else index
                self.text = self.text[:end]
                self.stopped_by_string = True

    def output(self, adapter: str | None) -> RequestOutput:
        seq = self.seq
        tokens = seq.output_token_ids
        # While a stop string may still be forming, hold back as much text as it is long.
        hold = (
            0
            if seq.is_finished or self.stopped_by_string
            else max((len(s) - 1 for s in seq.params.stop), default=0)
        )
        visible = max(self.emitted_text, len(self.text) - hold)
        delta_text = self.text[self.emitted_text : visible]
        delta_tokens = tokens[self.emitted_tokens :]
        self.emitted_text, self.emitted_tokens = visible, len(tokens)
        reason = seq.status.value if seq.is_finished else None
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            text=self.text[:visible],
            token_ids=list(tokens),
            finished=seq.is_finished,
            finish_reason=reason,
            adapter=adapter,
            delta_text=delta_text,
            delta_token_ids=delta_tokens,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            num_cached_tokens=seq.num_cached_tokens,
            arrival_time=seq.arrival_time,
            first_token_time=self.first_token_time,
            finished_time=time.monotonic() if seq.is_finished else None,
        )

"""What callers see of a request: text decoded incrementally, stop strings, timings."""

from __future__ import annotations

import time
from collections.abc import Callable
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
    finish_reason: str | None  # "stop", "length", "abort" or "error" once finished
    adapter: str | None
    delta_text: str = ""  # new since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # per output token, when asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # per prompt token (first: None)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
    error: Exception | None = None  # why the engine could not serve it (finish_reason "error")


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text without special tokens: the tokenizers library's own decode where
    transformers' wrapper would add nothing to it but a type check of every id (which costs
    more than the decode)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return lambda ids: backend.decode(ids, skip_special_tokens=True)


class RequestState:
    """Incremental detokenization and stop-string search of one request.

    Each step decodes a window of the last few output tokens, not the whole output (which
    cost 0.2 ms a sequence a step at 512 tokens): the new text is decode(window) minus
    decode(window without the new tokens). Both decodes start at the same token, so a leading
    space a tokenizer drops at the start of a decode cancels out, as in vLLM and TGI. For
    the same reason the first window starts in the prompt: SentencePiece's decoder (Llama 2,
    Mistral) strips the first token's space, which would lose the output's leading space.
    """

    PROMPT_CONTEXT = 5  # prompt tokens before the first output token in its window

    def __init__(self, seq: Sequence, tokenizer):
        self.seq = seq
        self.decode = text_decoder(tokenizer)
        self.prompt_token_ids = seq.prompt_token_ids  # one copy, shared by every output
        self.text = ""
        self.prefix_offset = self._first_window(seq)  # output token where the window starts
        self.read_offset = 0  # output tokens already in `text`
        self.emitted_tokens = 0
        self.emitted_text = 0
        self.logprobs: list[TokenLogprobs] | None = [] if seq.params.logprobs is not None else None
        wanted = seq.params.prompt_logprobs is not None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = [None] if wanted else None
        self.first_token_time: float | None = None
        self.stopped_by_string = False

    def _first_window(self, seq: Sequence) -> int:
        """Where the first decode window starts: a few prompt tokens back (a negative output
        index), unless they end inside a multi-byte character, which the output would then
        complete into text that `known` does not prefix."""
        n = seq.num_prompt_tokens
        context = min(self.PROMPT_CONTEXT, n)
        tail = seq.token_ids[n - context : n]
        return 0 if self.decode(tail).endswith("\ufffd") else -context

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
        if not self._detokenize():
            return
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

    def _detokenize(self) -> bool:
        """Append the text of the new output tokens; False while they end inside a multi-byte
        character (or are special tokens) and the sequence goes on."""
        seq = self.seq
        start = seq.num_prompt_tokens + self.prefix_offset
        window = seq.token_ids[start:]
        if seq.ended_on_stop_token and not seq.params.include_stop_str_in_output:
            window = window[:-1]
        known = self.decode(window[: self.read_offset - self.prefix_offset])
        text = self.decode(window)
        if len(text) <= len(known) or (text.endswith("\ufffd") and not seq.is_finished):
            return False
        self.text += text[len(known) :]
        self.prefix_offset, self.read_offset = self.read_offset, seq.num_output_tokens
        return True

    def output(self) -> RequestOutput:
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
        return self._output(tokens, reason, delta_text, delta_tokens)

    def failed_output(self, error: Exception) -> RequestOutput:
        """The last output of a request the engine could not serve (finish reason "error"):
        what earlier outputs held, nothing more decoded (decoding may be what failed)."""
        tokens = self.seq.output_token_ids[: self.emitted_tokens]
        if self.logprobs is not None:  # those of tokens no output held yet go
            del self.logprobs[len(tokens) :]
        return self._output(tokens, "error", "", [], error)

    def _output(
        self,
        tokens: list[int],
        reason: str | None,  # the finish reason, once finished
        delta_text: str,
        delta_tokens: list[int],
        error: Exception | None = None,
    ) -> RequestOutput:
        seq = self.seq
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=self.prompt_token_ids,
            text=self.text[: self.emitted_text],
            token_ids=tokens,  # a fresh list
            finished=reason is not None,
            finish_reason=reason,
            adapter=seq.adapter,
            delta_text=delta_text,
            delta_token_ids=delta_tokens,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            num_cached_tokens=seq.num_cached_tokens,
            arrival_time=seq.arrival_time,
            first_token_time=self.first_token_time,
            finished_time=time.monotonic() if reason is not None else None,
            error=error,
        )

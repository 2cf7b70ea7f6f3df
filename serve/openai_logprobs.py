"""OpenAI's `logprobs` shapes built from the engine's TokenLogprobs.

Chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.
Completions: parallel lists `tokens`, `token_logprobs`, `top_logprobs` ({token: logprob})
and `text_offset`; with `echo`, the prompt's tokens come first, the very first without a
logprob (nothing precedes it). Logprobs are the model's, before penalties, grammar masks and
temperature (as vLLM's default), so they score text the same whatever the sampling.
"""

from __future__ import annotations

from functools import lru_cache

from serve.sampler import TokenLogprobs


class LogprobsFormatter:
    """Token strings are each token decoded alone (a byte-level token that is half of a
    character decodes to U+FFFD, as in vLLM); `bytes` are that string's UTF-8."""

    def __init__(self, tokenizer):
        self._decode = lru_cache(maxsize=65536)(
            lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)
        )

    def token(self, token_id: int) -> str:
        return self._decode(token_id)

    def chat(self, logprobs: list[TokenLogprobs]) -> dict:
        """The `logprobs` of a chat choice (or of a chunk's delta tokens)."""
        return {
            "content": [
                {
                    **self._entry(lp.token_id, lp.logprob),
                    "top_logprobs": [self._entry(t, v) for t, v in lp.top],
                }
                for lp in logprobs
            ],
            "refusal": None,
        }

    def completion(
        self, token_ids: list[int], logprobs: list[TokenLogprobs | None], text_offset: int = 0
    ) -> dict:
        """The `logprobs` of a completion choice: one entry per token; None where a token has
        no logprob (the prompt's first). Offsets count characters of the choice's text from
        `text_offset`."""
        tokens = [self.token(t) for t in token_ids]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [None if lp is None else lp.logprob for lp in logprobs],
            "top_logprobs": [
                None if lp is None else {self.token(t): v for t, v in lp.top} for lp in logprobs
            ],
            "text_offset": offsets,
        }

    def _entry(self, token_id: int, logprob: float) -> dict:
        token = self.token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


class _Cursor:
    """One request's logprobs handed out as its outputs arrive: each `take` covers the output
    tokens added since the last one (an output's `token_ids` is a snapshot, while the list
    of logprobs the engine thread appends to may already be longer)."""

    def __init__(self, formatter: LogprobsFormatter):
        self.formatter = formatter
        self.sent = 0  # output tokens whose logprobs were taken

    def _new(self, out) -> tuple[list[int], list[TokenLogprobs]]:
        end = len(out.token_ids)
        new = slice(self.sent, end)
        self.sent = end
        return out.token_ids[new], out.logprobs[new]


class ChatLogprobs(_Cursor):
    def take(self, out) -> dict | None:
        """The `logprobs` of a chat choice or chunk; None unless the request asked."""
        if out.logprobs is None:
            return None
        return self.formatter.chat(self._new(out)[1])


class CompletionLogprobs(_Cursor):
    def __init__(self, formatter: LogprobsFormatter, prompt: str, echo: bool):
        super().__init__(formatter)
        self.echo_pending = echo  # the prompt's tokens go first, once
        self.offset = 0 if echo else len(prompt)  # offsets count from the prompt's start

    def take(self, out) -> dict | None:
        """The `logprobs` of a completion choice or chunk; None unless the request asked."""
        if out.logprobs is None:
            return None
        token_ids, entries = self._new(out)
        if self.echo_pending:
            self.echo_pending = False
            prompt = out.prompt_token_ids
            token_ids, entries = prompt + token_ids, out.prompt_logprobs[: len(prompt)] + entries
        result = self.formatter.completion(token_ids, entries, self.offset)
        self.offset += sum(len(token) for token in result["tokens"])
        return result

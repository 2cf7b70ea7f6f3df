"""OpenAI's `logprobs` shapes built from the engine's TokenLogprobs.

Chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.
Completions: parallel lists `tokens`, `token_logprobs`, `top_logprobs` ({token: logprob})
and `text_offset`; with `echo`, the prompt's tokens come first, the very first without a
logprob (nothing precedes it). Logprobs are the model's, before penalties, grammar masks and
temperature (as vLLM's default), so they score text the same whatever the sampling.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Callable
from functools import lru_cache

from serve.sampler import TokenLogprobs


class LogprobsFormatter:
    """Token strings are each token's own bytes as text (a byte-level token that is half of
    a character reads U+FFFD, as in vLLM; a SentencePiece token keeps its leading space,
    which decoding it alone would strip); `bytes` are those bytes, so that joining them
    rebuilds a character split across tokens (OpenAI's meaning)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bytes_of = lru_cache(maxsize=65536)(token_bytes(tokenizer))

    def text_offsets(self, text: str, token_ids: list[int]) -> list[int] | None:
        """Where each of a text prompt's tokens starts in the text, from the tokenizer's own
        offsets: a BOS it added starts at 0 with no width, and a SentencePiece token's
        leading space that the text never had takes none. None where the tokenizer gives
        no offsets (a slow one) or tokenizes the text otherwise now."""
        if not getattr(self.tokenizer, "is_fast", False):
            return None
        encoded = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        if encoded["input_ids"] != token_ids:
            return None
        return [start for start, _ in encoded["offset_mapping"]]

    def token(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")

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
        self, token_ids: list[int], logprobs: list[TokenLogprobs | None], offsets: list[int]
    ) -> dict:
        """The `logprobs` of a completion choice: one entry per token; None where a token has
        no logprob (the prompt's first). `offsets`: each token's character offset."""
        tokens = [self.token(t) for t in token_ids]
        return {
            "tokens": tokens,
            "token_logprobs": [None if lp is None else _json(lp.logprob) for lp in logprobs],
            "top_logprobs": [None if lp is None else self._top(lp) for lp in logprobs],
            "text_offset": offsets,
        }

    def _top(self, lp: TokenLogprobs) -> dict[str, float]:
        """The token itself first, then its alternatives: OpenAI always returns the sampled
        token's logprob in `top_logprobs`, so there may be `logprobs` + 1 entries."""
        chosen = self.token(lp.token_id)  # its own value, whatever alternative reads the same
        return {chosen: _json(lp.logprob)} | {
            token: _json(v) for t, v in lp.top if (token := self.token(t)) != chosen
        }

    def _entry(self, token_id: int, logprob: float) -> dict:
        return {
            "token": self.token(token_id),
            "logprob": _json(logprob),
            "bytes": list(self.bytes_of(token_id)),
        }


# vLLM's stand-in for a logprob of -inf (a token masked out): JSON has no infinity.
MIN_LOGPROB = -9999.0


def _json(logprob: float) -> float | None:
    """A logprob as JSON can hold it: -inf as MIN_LOGPROB, NaN (a broken model: the gate
    fails it) as null; strict JSON has neither, and the response would be a 500."""
    if math.isnan(logprob):
        return None
    return max(logprob, MIN_LOGPROB)


def token_bytes(tokenizer) -> Callable[[int], bytes]:
    """token id -> its own bytes. Byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen) spells each
    byte as one character; SentencePiece spells a fallback byte `<0xNN>` and a space `▁`."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str())["decoder"] if backend is not None else None
    if '"ByteLevel"' in json.dumps(decoder):
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

        def spelled(piece: str) -> bytes:
            return b"".join(
                bytes([byte_of[c]]) if c in byte_of else c.encode("utf-8") for c in piece
            )

    else:

        def spelled(piece: str) -> bytes:
            if match := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
                return bytes([int(match[1], 16)])
            return piece.replace("\u2581", " ").encode("utf-8")

    def token_bytes_of(token_id: int) -> bytes:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        # None: an id past the tokenizer in an embedding padded to a round size (Qwen2.5's)
        return b"" if piece is None else spelled(piece)

    return token_bytes_of


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
    def __init__(self, formatter: LogprobsFormatter, prompt: str, from_text: bool, echo: bool):
        """prompt: the choice's prompt as text (echoed, and where offsets count from);
        from_text: whether the request gave it so (not as token ids, decoded)."""
        super().__init__(formatter)
        self.prompt, self.from_text = prompt, from_text
        self.echo_pending = echo  # the prompt's tokens go first, once
        self.offset = len(prompt)  # offsets count from the prompt's start
        # Characters as the tokens' bytes decode, across chunks: a character split over
        # tokens counts once, where its last byte lands.
        self.chars = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, out) -> dict | None:
        """The `logprobs` of a completion choice or chunk; None unless the request asked."""
        if out.logprobs is None:
            return None
        token_ids, entries = self._new(out)
        offsets, counted = [], token_ids
        if self.echo_pending:
            self.echo_pending = False
            prompt = out.prompt_token_ids
            spans = self.formatter.text_offsets(self.prompt, prompt) if self.from_text else None
            if spans is None:  # decoded ids: their bytes count from the start, as the output's
                self.offset, counted = 0, prompt + token_ids
            else:
                offsets = spans
            token_ids, entries = prompt + token_ids, out.prompt_logprobs[: len(prompt)] + entries
        for token_id in counted:
            offsets.append(self.offset)
            self.offset += len(self.chars.decode(self.formatter.bytes_of(token_id)))
        return self.formatter.completion(token_ids, entries, offsets)

"""A request's prompt read into token ids within the context: text too long to fit refused
before it is tokenized, and the `max_tokens` the rest of the context leaves."""

from __future__ import annotations

from jinja2 import TemplateError

from serve.prompts import chat_prompt_ids, text_prompt_ids
from serve.protocol import InvalidField

# Text prompts are refused past this many characters per token of the context length, before
# tokenizing (which costs in proportion): tokenizers average 3-5 characters per token.
CHARS_PER_TOKEN_BOUND = 16


class PromptReader:
    def __init__(self, tokenizer, max_model_len: int, default_max_tokens: int | None):
        self.tokenizer = tokenizer
        self.context = max_model_len
        self.default_max_tokens = default_max_tokens
        self.max_chars = max_model_len * CHARS_PER_TOKEN_BOUND

    def check_length(self, field: str, chars: int) -> None:
        """Refuse text that cannot fit the context before tokenizing it."""
        if chars > self.max_chars:
            raise InvalidField(
                field,
                f"{chars} characters cannot fit the context length of {self.context} tokens "
                f"(at most {self.max_chars} characters)",
                "context_length_exceeded",
            )

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Messages through the base model's chat template, ready for the answer."""
        try:
            return chat_prompt_ids(self.tokenizer, messages, add_generation_prompt)
        except TemplateError as error:  # the template's raise_exception: roles, order
            raise InvalidField("messages", f"the chat template refused them: {error}") from None

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return text_prompt_ids(self.tokenizer, prompt, add_special_tokens)

    def max_tokens_for(self, body, prompt_tokens: int, field: str) -> int:
        """The request's `max_tokens` for one prompt: refused (as vLLM and OpenAI do) if it
        cannot fit the context with the prompt, so a reply is never cut by the context while
        `length` says it was cut by `max_tokens`; if not given, the default or the room left."""
        room = self.context - prompt_tokens
        if room < 1:
            raise InvalidField(
                field,
                f"the prompt has {prompt_tokens} tokens; the context length is {self.context}, "
                "with room for at least one output token",
                "context_length_exceeded",
            )
        if body.max_tokens is None:
            return min(self.default_max_tokens or room, room)
        if body.max_tokens > room:
            raise InvalidField(
                body.max_tokens_field,
                f"{body.max_tokens} is too large: the context length is {self.context} tokens "
                f"and the prompt has {prompt_tokens}, leaving room for {room}",
                "context_length_exceeded",
            )
        if body.max_tokens == 0 and not getattr(body, "echo", False):
            raise InvalidField("max_tokens", "0 is only allowed with echo (to score the prompt)")
        return max(body.max_tokens, 1)  # 0: one token is computed, and not returned

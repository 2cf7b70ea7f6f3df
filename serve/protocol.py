"""The OpenAI request and response shapes the server speaks (the subset loraplex serves)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from registry.config_file import AdapterName
from registry.errors import UsageError
from serve.response_format import ResponseFormat
from serve.sampling_params import (
    MAX_LOGPROBS,
    PENALTY_RANGE,
    REPETITION_RANGE,
    SEED_RANGE,
    SamplingParams,
)


class JsonSchemaSpec(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # the JSON schema the output must match
    strict: bool | None = None  # always enforced, as strict: true


class ResponseFormatSpec(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    # json_object's schema beside the type (instructor's JSON_SCHEMA mode, Together, Fireworks)
    schema_: dict | None = Field(None, alias="schema")

    def parsed(self) -> ResponseFormat | None:
        return ResponseFormat.parse(self.model_dump(by_alias=True))


def _default_only(cls, value, info):
    """A field whose other values would change the answer, and are not served: refused."""
    if value != cls.model_fields[info.field_name].default:
        raise ValueError("not supported by this server")
    return value


MAX_CHOICES = 16  # `n`: each choice holds its own KV blocks and batch slot


class _NullMeansDefault(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        """OpenAI types most fields "X or null", null meaning the default (the openai client
        sends it for a None argument)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if v is not None or k not in fields or fields[k].default is None
        }


class StreamOptions(_NullMeansDefault):
    include_usage: bool = False  # a last chunk with the request's usage
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, each chunk its choice's


class _Request(_NullMeansDefault):
    # Unknown fields are ignored, as OpenAI's clients send fields this server does not use.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # 0 or vLLM's -1: off
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices per prompt, each its own request
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's: ids that end the answer like EOS does
    include_stop_str_in_output: bool = False  # vLLM's: keep the stop string in the text
    # vLLM's extensions this server does not serve: a value but the default ("off") would
    # change the answer, so it is refused rather than ignored.
    min_tokens: int = 0
    min_p: float = 0.0
    use_beam_search: bool = False
    length_penalty: float = 1.0
    prompt_logprobs: int | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict | None = None  # vLLM's newer name for the guided_* fields
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    frequency_penalty: float = Field(0.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    presence_penalty: float = Field(0.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    repetition_penalty: float = Field(1.0, ge=REPETITION_RANGE[0], le=REPETITION_RANGE[1])
    ignore_eos: bool = False
    response_format: ResponseFormatSpec | None = None
    logit_bias: dict[str, float] | None = None  # token id -> added to its logit, in [-100, 100]

    _unserved = field_validator(
        "min_tokens",
        "min_p",
        "use_beam_search",
        "length_penalty",
        "prompt_logprobs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "structured_outputs",
        "allowed_token_ids",
        "bad_words",
        "truncate_prompt_tokens",
        "skip_special_tokens",
    )(_default_only)

    @field_validator("stream_options")
    @classmethod
    def _with_stream(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed with stream: true")
        return value

    @field_validator("response_format")
    @classmethod
    def _enforceable(cls, value: ResponseFormatSpec | None):
        if value is not None:
            value.parsed()  # a schema llguidance cannot enforce is a 400 naming the field
        return value

    @property
    def max_tokens_field(self) -> str:
        """The field that set `max_tokens`, for its errors to name."""
        return "max_tokens"

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's params, with `max_tokens` as the server settled it for one prompt."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        logprobs, prompt_logprobs = self.logprobs_asked()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=stop,
            stop_token_ids=self.stop_token_ids or (),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            response_format=self.response_format.parsed() if self.response_format else None,
            logit_bias=self.logit_bias,
        )

    def choice_params(self, max_tokens: int) -> list[SamplingParams]:
        """The params of each of the `n` choices: a given seed is offset per choice, so the
        choices differ as OpenAI's do (the first keeps it, as with n=1)."""
        params = self.sampling_params(max_tokens)
        if self.seed is None:
            return [params] * self.n
        return [
            params if j == 0 else dataclasses.replace(params, seed=(self.seed + j) % 2**63)
            for j in range(self.n)
        ]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk, its choice's so far (vLLM's continuous_usage_stats)."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    def logprobs_asked(self) -> tuple[int | None, int | None]:
        """Top alternatives wanted per output token and per prompt token (None: no logprobs)."""
        return None, None


class TextPart(BaseModel):
    type: Literal["text"]  # images, audio and files: refused, as the base reads text only
    text: str


FUNCTION_CALLING = "function calling is not supported by this server"


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]  # a string, or OpenAI's content parts

    @model_validator(mode="before")
    @classmethod
    def _no_function_calling(cls, data):
        """A tool's turn or an assistant's call in the history: refused as such, not as the
        null content or unknown role it also has (nor its call silently left out)."""
        if not isinstance(data, dict):
            return data
        if data.get("role") in ("tool", "function"):
            raise ValueError(f"{FUNCTION_CALLING} (a message of role {data['role']!r})")
        if called := [key for key in ("tool_calls", "function_call") if data.get(key)]:
            raise ValueError(f"{FUNCTION_CALLING} (an assistant message with {called[0]})")
        return data

    def for_template(self) -> dict:
        """As chat templates take it: `developer` is OpenAI's newer name for `system`."""
        content = self.content
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class _UnservedRendering(BaseModel):
    """vLLM's ways to render messages otherwise: not served, refused but at their defaults."""

    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    documents: list | None = None

    _unserved_rendering = field_validator(
        "continue_final_message", "chat_template", "chat_template_kwargs", "documents"
    )(_default_only)


class ChatCompletionRequest(_Request, _UnservedRendering):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False  # each output token's logprob
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # and its n likeliest ones
    # Function calling would change what the answer is: refused, never silently ignored.
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    # More of vLLM's ways to render the prompt otherwise (_UnservedRendering has the rest)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    echo: bool = False
    # OpenAI's fields for other models' answers (audio, web search, reasoning): refused.
    modalities: list[str] | None = None
    audio: dict | None = None
    web_search_options: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None

    _unserved_chat = field_validator(
        "add_generation_prompt",
        "add_special_tokens",
        "echo",
        "audio",
        "web_search_options",
        "reasoning_effort",
        "verbosity",
    )(_default_only)

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value):
        if value not in (None, ["text"]):
            raise ValueError("only ['text'] is supported by this server")
        return value

    @field_validator("tools", "functions", "function_call")
    @classmethod
    def _no_functions(cls, value):
        if value:
            raise ValueError(FUNCTION_CALLING)
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value):
        if value not in (None, "none"):
            raise ValueError(FUNCTION_CALLING)
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value

    @model_validator(mode="after")
    def _newer_name_wins(self):
        """`max_completion_tokens`, OpenAI's newer name for `max_tokens`, wins over it."""
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def max_tokens_field(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    def logprobs_asked(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # per token; 0: only its own
    echo: bool = False  # the prompt before the completion (with logprobs: theirs too)
    suffix: str | None = None  # insertion: not served, refused if given
    best_of: int | None = None  # server-side ranking of choices: not served beyond `n`
    add_special_tokens: bool = True  # vLLM's; off is not served (a BOS is the model's)

    _unserved_rendering = field_validator("add_special_tokens")(_default_only)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("insertion (suffix) is not supported by this server")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value, info):
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("only best_of equal to n is supported (no ranking of choices)")
        return value

    def logprobs_asked(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """One prompt, or a batch of them (OpenAI's list of strings or of token lists)."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: AdapterName  # what requests will call it in `model`
    source: str  # registry reference or PEFT folder


class LoraAdapterLoad(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body."""

    lora_name: AdapterName
    lora_path: str  # here also a registry reference
    load_inplace: bool = False  # replace an adapter loaded under the name (else a 400)


class LoraAdapterUnload(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter body (its lora_int_id names nothing here)."""

    lora_name: str


class TokenizeRequest(_NullMeansDefault, _UnservedRendering):
    """vLLM's POST /tokenize body: a text prompt or chat messages, into the ids a completion
    or chat request would feed the model (its two request types, told apart by field)."""

    # Unknown fields are ignored, as vLLM does (a client may send its chat body to count it)
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # checked if given; every adapter shares the base's tokenizer
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True  # messages: open the assistant's answer
    return_token_strs: bool = False  # each id's token as the vocabulary spells it
    # vLLM's other ways to render messages (_UnservedRendering has the rest): refused
    tools: list | None = None
    mm_processor_kwargs: dict | None = None

    _unserved = field_validator("tools", "mm_processor_kwargs")(_default_only)

    def check(self) -> None:
        """What the fields' types cannot say, as a 400 naming the field."""
        if (self.prompt is None) == (self.messages is None):
            field = "messages" if self.messages is not None else "prompt"
            raise InvalidField(field, "give prompt (text) or messages (a chat), one of them")
        if self.messages is not None and self.add_special_tokens:
            raise InvalidField(
                "add_special_tokens",
                "must be false with messages: the chat template writes the special tokens",
            )


class DetokenizeRequest(_NullMeansDefault):
    """vLLM's POST /detokenize body."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class InvalidField(UsageError):
    """A 400 that names the request's field at fault (OpenAI's `param`)."""

    def __init__(self, param: str, message: str, code: str | None = None):
        super().__init__(f"{param}: {message}", param=param)
        self.code = code


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

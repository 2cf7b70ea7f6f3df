"""How to pick each next token of one request, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from registry.errors import UsageError
from serve.response_format import ResponseFormat

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily
# Bounds (inclusive) the engine takes; the server's request models take the same
PENALTY_RANGE = (-2, 2)  # frequency and presence penalties, OpenAI's range
REPETITION_RANGE = (0.01, 100)  # beyond, logits overflow
SEED_RANGE = (-(2**63), 2**64 - 1)  # a signed or unsigned 64-bit integer, as vLLM takes
MAX_LOGPROBS = 20  # alternatives per token, OpenAI's limit


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Decoding settings of one request (the OpenAI and vLLM names and meanings).

    temperature 0 (or below 1e-5) is greedy. top_k 0 and top_p 1 disable those filters.
    Penalties follow CTRL (repetition: divides positive logits of prompt and generated tokens,
    multiplies negative ones), then OpenAI (frequency, presence: subtracted from logits of
    generated tokens), in vLLM's order. `response_format` constrains the output to JSON
    (OpenAI's shape, e.g. `{"type": "json_object"}`).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n alternatives per generated token (0: only the chosen)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first
    response_format: ResponseFormat | None = None  # None: free text
    logit_bias: tuple[tuple[int, float], ...] = field(default=())  # (token id, added to its logit)

    def __post_init__(self):
        # Lists are accepted for convenience; stored as tuples so params stay hashable.
        object.__setattr__(self, "stop", _tuple(self.stop, str, "stop"))
        object.__setattr__(
            self, "stop_token_ids", _tuple(self.stop_token_ids, int, "stop_token_ids")
        )
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        # OpenAI's dict is accepted; stored as a frozen ResponseFormat (or None for "text").
        object.__setattr__(self, "response_format", ResponseFormat.parse(self.response_format))
        for name in ("max_tokens", "top_k", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)  # each becomes a count, an index or a C integer
            optional = name not in ("max_tokens", "top_k")
            integer = isinstance(value, int) and not isinstance(value, bool)
            _check(integer or (optional and value is None), name, "must be an integer", value)
        _check(self.max_tokens >= 1, "max_tokens", "must be at least 1", self.max_tokens)
        # Finite: logits divided by an infinite temperature are NaN, and the draw then takes
        # the vocabulary's last id, whatever a grammar allows.
        temperature = self.temperature
        _check(
            math.isfinite(temperature) and temperature >= 0,
            "temperature",
            "must be a finite number >= 0",
            temperature,
        )
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        # top_k becomes an int64 tensor row: past int32 it means "all" anyway
        _check(
            0 <= self.top_k < 2**31, "top_k", "must be in [0, 2**31) (0 disables it)", self.top_k
        )
        for name in ("frequency_penalty", "presence_penalty"):
            _in_range(getattr(self, name), PENALTY_RANGE, name)
        _in_range(self.repetition_penalty, REPETITION_RANGE, "repetition_penalty")
        if self.seed is not None:
            shown = "[-2**63, 2**64) (a 64-bit integer)"
            _in_range(self.seed, SEED_RANGE, "seed", shown)
        _check("" not in self.stop, "stop", "must not hold an empty string", self.stop)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _in_range(getattr(self, name), (0, MAX_LOGPROBS), name)

    @property
    def greedy(self) -> bool:
        # As vLLM: below 1e-5 too, where dividing logits by it would overflow to inf.
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return (
            self.frequency_penalty != 0
            or self.presence_penalty != 0
            or self.repetition_penalty != 1
        )


def _tuple(value, kind, name: str) -> tuple:
    items = (value,) if isinstance(value, kind) else tuple(value or ())
    for item in items:
        _check(isinstance(item, kind), name, f"must hold {kind.__name__} values", item)
    return items


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """OpenAI's {token id (a string in JSON): bias in [-100, 100]}, or (id, bias) pairs."""
    pairs = value.items() if isinstance(value, dict) else value or ()
    bias = []
    for token, amount in pairs:
        _check(
            str(token).isascii() and str(token).isdigit(),
            "logit_bias",
            "keys must be token ids",
            token,
        )
        _check(-100 <= amount <= 100, "logit_bias", "values must be in [-100, 100]", amount)
        bias.append((int(token), float(amount)))
    return tuple(sorted(bias))


def _in_range(value, bounds: tuple, name: str, shown: str | None = None) -> None:
    low, high = bounds
    _check(low <= value <= high, name, f"must be in {shown or f'[{low}, {high}]'}", value)


def _check(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
        raise UsageError(f"{name} {rule} (got {value!r})", param=name)

"""What a request's output must be: free text, any JSON object, or JSON matching a schema.

OpenAI's `response_format`, checked on construction with llguidance's JSON-schema compiler, so
a schema it cannot enforce is refused before the request is queued.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from registry.errors import UsageError

FIELD = "response_format"
JSON_OBJECT = '{"type": "object"}'
# Any JSON whitespace, at most 2 characters at a time: small models asked for free whitespace
# can emit newlines until max_tokens, and this still allows `": "`, `", "` and `{\n`.
WHITESPACE = r"[\x20\x0A\x0D\x09]{0,2}"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """The output must be JSON valid under `json_schema` (JSON text, the key of the compiled
    grammar; keys keep their order, which is the order properties are written in).
    `{"type": "json_object"}` is the schema `{"type": "object"}`."""

    json_schema: str = JSON_OBJECT

    def __post_init__(self):
        grammar(self.json_schema)  # raises UsageError naming the field

    @classmethod
    def parse(cls, value) -> ResponseFormat | None:
        """From OpenAI's shape: `{"type": "text"}` (None: no constraint), `{"type":
        "json_object"}`, or `{"type": "json_schema", "json_schema": {"name": ..., "schema":
        {...}, "strict": ...}}`, or `{"type": "json_object", "schema": {...}}`. The schema is
        always enforced, as OpenAI's `strict: true`."""
        if value is None or isinstance(value, ResponseFormat):
            return value
        if not isinstance(value, dict):
            raise UsageError(
                f"{FIELD} must be an object such as {{'type': 'json_object'}} (got {value!r})"
            )
        kind = value.get("type")
        if kind == "text":
            return None
        if kind == "json_object" and value.get("schema") is None:
            return cls()
        if kind == "json_object":
            # The schema beside the type: what instructor's JSON_SCHEMA mode (RAGAS judges),
            # Together and Fireworks send.
            spec = {"schema": value["schema"]}
        elif kind == "json_schema":
            spec = value.get("json_schema")
        else:
            raise UsageError(
                f"{FIELD}.type must be 'text', 'json_object' or 'json_schema' (got {kind!r})"
            )
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise UsageError(
                f"{FIELD}.json_schema.schema must be a JSON schema object (got {schema!r})"
            )
        try:
            text = json.dumps(schema, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise UsageError(f"{FIELD}.json_schema.schema is not JSON: {error}") from None
        return cls(text)


@lru_cache(maxsize=256)
def grammar(json_schema: str) -> str:
    """The llguidance grammar of a schema; UsageError naming the field when it is unusable."""
    import llguidance

    try:
        compiled = llguidance.LLMatcher.grammar_from_json_schema(
            json_schema, defaults={"whitespace_pattern": WHITESPACE}
        )
    except ValueError as error:
        raise UsageError(f"{FIELD} holds an invalid JSON schema: {error}") from None
    problem = llguidance.LLMatcher.validate_grammar(compiled)
    if problem:
        raise UsageError(f"{FIELD} holds a JSON schema that cannot be enforced: {problem}")
    return compiled

"""Optional API keys: who is calling, which models they may use, how many tokens a minute.

Keys are compared by SHA-256, so the config (and memory) never holds a key in the clear, and
nothing here logs one. With no keys configured every request is let through as `anonymous`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from registry.errors import ConfigError
from registry.refs import is_ref, parse_ref
from serve.refusal import Refusal
from serve.serve_config import ApiKey


class TokenBucket:
    """A tokens-per-minute budget: the level refills at `per_minute / 60` tokens a second up to
    `per_minute`. A request is admitted while the level is positive and takes the most it can
    use (its prompt and `max_tokens`) at once, so one large request can push the level below
    zero and requests streaming at the same time cannot all be admitted on one positive level;
    what it did not use comes back when it ends.
    """

    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60  # tokens per second
        self.level = self.capacity
        self.updated = now

    def retry_after(self, now: float) -> float:
        """Seconds until a request is admitted again (0: admitted now)."""
        self._refill(now)
        return 0.0 if self.level > 0 else (1 - self.level) / self.rate

    def charge(self, tokens: int, now: float) -> None:
        self._refill(now)
        self.level -= tokens

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now


@dataclass
class Caller:
    id: str  # the key's id ("anonymous" with keys off)
    adapters: list[str]
    admin: bool
    bucket: TokenBucket | None

    def may_use(self, model: str) -> bool:
        """`*`, the exact `model`, or its adapter name (any version or alias of it)."""
        if "*" in self.adapters or model in self.adapters:
            return True
        return is_ref(model) and parse_ref(model).name in self.adapters


class ApiKeys:
    def __init__(self, keys: list[ApiKey], clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.enabled = bool(keys)
        self._by_digest: dict[str, Caller] = {}
        for key in keys:
            digest = key.sha256 or _digest(_from_env(key))
            if digest in self._by_digest:  # one secret, two callers: the later one won silently
                other = self._by_digest[digest].id
                raise ConfigError(f"api_keys: keys {other!r} and {key.id!r} have the same secret")
            bucket = TokenBucket(key.tokens_per_minute, clock()) if key.tokens_per_minute else None
            self._by_digest[digest] = Caller(key.id, key.adapters, key.admin, bucket)
        self._anonymous = Caller("anonymous", ["*"], True, None)

    def caller(self, authorization: str | None) -> Caller:
        """The caller an `Authorization: Bearer KEY` header names; 401 when keys are on and it
        is missing or unknown."""
        if not self.enabled:
            return self._anonymous
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Refusal(401, "missing API key (Authorization: Bearer KEY)", *_AUTH)
        digest = _digest(key.strip())
        for known, caller in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return caller
        raise Refusal(401, "unknown API key", *_AUTH)

    def admit(self, caller: Caller, model: str | None) -> None:
        """403 for a model off the caller's allow-list (None: no model named), 429 while its
        token budget is spent (checked again by `reserve`, once the request's size is known)."""
        if model is not None and not caller.may_use(model):
            raise Refusal(
                403,
                f"key {caller.id!r} may not use model {model!r}",
                "permission_error",
                "model_not_allowed",
            )
        self._check_budget(caller)

    def reserve(self, caller: Caller, tokens: int) -> int:
        """Take the most tokens a request can use from the caller's budget (429 while it is
        spent); what it takes, which `settle` gets back when the request ends."""
        if caller.bucket is None:
            return 0
        self._check_budget(caller)  # no await since: requests cannot pass it in between
        caller.bucket.charge(tokens, self.clock())
        return tokens

    def require_admin(self, caller: Caller) -> None:
        if not caller.admin:
            raise Refusal(
                403, f"key {caller.id!r} may not load or unload adapters", "permission_error"
            )

    def settle(self, caller: Caller, reserved: int, used: int) -> None:
        """Charge a finished request's tokens, against what it reserved."""
        if caller.bucket is not None and used != reserved:
            caller.bucket.charge(used - reserved, self.clock())

    def _check_budget(self, caller: Caller) -> None:
        if caller.bucket is None:
            return
        wait = caller.bucket.retry_after(self.clock())
        if wait > 0:
            raise Refusal(
                429,
                f"key {caller.id!r} is over its tokens per minute; retry in {wait:.0f} s",
                "tokens",
                "rate_limit_exceeded",
                {"Retry-After": str(math.ceil(wait))},
            )


_AUTH = ("authentication_error", "invalid_api_key")


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _from_env(key: ApiKey) -> str:
    """The key's secret, without the newline a secret made from a file often ends with (a
    client's key is read stripped: with it, no client could ever match)."""
    value = os.environ.get(key.env or "", "").strip()
    if not value:
        raise ConfigError(f"api_keys: key {key.id!r}: environment variable {key.env} is not set")
    return value

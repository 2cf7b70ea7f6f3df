"""API keys without a server: key lookup, allow-lists and the token bucket, on a fake clock."""

from __future__ import annotations

import hashlib

import pytest

from registry.errors import ConfigError
from serve.api_keys import ApiKeys, TokenBucket
from serve.refusal import Refusal
from serve.serve_config import ApiKey


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _key(id: str, secret: str, **fields) -> ApiKey:
    return ApiKey(id=id, sha256=hashlib.sha256(secret.encode()).hexdigest(), **fields)


def test_the_bucket_refills_at_its_rate_and_a_spent_one_says_how_long_to_wait():
    bucket = TokenBucket(per_minute=60, now=0.0)  # one token a second
    assert bucket.retry_after(0.0) == 0
    bucket.charge(100, now=0.0)  # one large request may overdraw it
    assert bucket.level == -40
    assert bucket.retry_after(0.0) == 41  # back to one token
    assert bucket.retry_after(30.0) == 11
    assert bucket.retry_after(41.5) == 0
    assert bucket.retry_after(1000.0) == 0 and bucket.level == 60  # capped at a minute's worth


@pytest.mark.parametrize(
    ("allowed", "model", "ok"),
    [
        (["*"], "anything", True),
        (["faq"], "faq", True),
        (["faq"], "faq@champion", True),
        (["faq"], "faq/3", True),
        (["faq@champion"], "faq@champion", True),
        (["faq@champion"], "faq/3", False),
        (["faq"], "facts", False),
        (["faq"], "smollm2-135m-instruct", False),
        ([], "faq", False),
    ],
)
def test_allow_lists_match_the_model_or_its_adapter_name(allowed, model, ok):
    keys = ApiKeys([_key("k", "secret", adapters=allowed)])
    caller = keys.caller("Bearer secret")
    if ok:
        keys.admit(caller, model)
    else:
        with pytest.raises(Refusal) as refused:
            keys.admit(caller, model)
        assert refused.value.status == 403 and refused.value.code == "model_not_allowed"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing API key"),
        ("Bearer ", "missing API key"),
        ("Basic secret", "missing API key"),
        ("Bearer guess", "unknown API key"),
    ],
)
def test_missing_or_unknown_keys_are_401(header, message):
    keys = ApiKeys([_key("k", "secret")])
    with pytest.raises(Refusal, match=message) as refused:
        keys.caller(header)
    assert refused.value.status == 401


def test_keys_from_the_environment_and_the_rate_limit_per_key(monkeypatch):
    monkeypatch.setenv("TEAM_KEY", "from-env")
    clock = Clock()
    keys = ApiKeys(
        [ApiKey(id="team", env="TEAM_KEY", tokens_per_minute=60), _key("ops", "ops")], clock
    )
    team, ops = keys.caller("bearer from-env"), keys.caller("Bearer ops")
    assert (team.id, ops.id) == ("team", "ops")
    keys.settle(team, reserved=0, used=90)
    assert keys.reserve(ops, 10**6) == 0  # no limit set: nothing taken
    with pytest.raises(Refusal) as limited:
        keys.admit(team, "faq")
    assert (limited.value.status, limited.value.headers) == (429, {"Retry-After": "31"})
    keys.admit(ops, "faq")
    clock.now = 31
    keys.admit(team, "faq")


def test_keys_off_let_everyone_in_and_a_missing_variable_is_a_config_error(monkeypatch):
    anonymous = ApiKeys([]).caller(None)
    assert anonymous.id == "anonymous" and anonymous.may_use("anything")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError, match="key 'k': environment variable NOT_SET_ANYWHERE"):
        ApiKeys([ApiKey(id="k", env="NOT_SET_ANYWHERE")])


def test_a_star_inside_an_allow_list_entry_is_a_config_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="'faq-\\*': entries are model values"):
        _key("k", "secret", adapters=["faq-*"])
    assert _key("k", "secret", adapters=["*", "faq"]).adapters == ["*", "faq"]


def test_a_reservation_holds_back_concurrent_requests_and_what_it_did_not_use_comes_back():
    clock = Clock()
    keys = ApiKeys([_key("team", "secret", tokens_per_minute=60)], clock)
    team = keys.caller("Bearer secret")
    first = keys.reserve(team, 40)  # prompt + max_tokens: the most it can use
    second = keys.reserve(team, 40)  # the level (20) was still positive
    assert (first, second, team.bucket.level) == (40, 40, -20)
    with pytest.raises(Refusal) as limited:  # a third, while both are in flight
        keys.reserve(team, 40)
    assert limited.value.status == 429 and limited.value.code == "rate_limit_exceeded"
    keys.settle(team, first, used=10)  # it stopped early: 30 come back
    keys.settle(team, second, used=0)  # refused after reserving (unknown model): all back
    assert team.bucket.level == 50
    assert keys.reserve(team, 40) == 40


def test_a_secret_from_a_file_keeps_no_newline_and_two_keys_may_not_share_one(monkeypatch):
    """A secret made from a file ends in a newline: hashed with it, no client (whose key is
    read stripped) could ever match. Two keys of one secret: the later took the earlier's
    place, and a key meant read-only was admin."""
    monkeypatch.setenv("TEAM_KEY", "sk-team\n")
    keys = ApiKeys([ApiKey(id="team", env="TEAM_KEY")])
    assert keys.caller("Bearer sk-team").id == "team"
    with pytest.raises(ConfigError, match="keys 'ro' and 'ops' have the same secret"):
        ApiKeys([_key("ro", "sk-1", adapters=["faq"]), _key("ops", "sk-1", admin=True)])
    monkeypatch.setenv("OPS_KEY", "sk-team")
    with pytest.raises(ConfigError, match="keys 'team' and 'ops' have the same secret"):
        ApiKeys([ApiKey(id="team", env="TEAM_KEY"), ApiKey(id="ops", env="OPS_KEY")])

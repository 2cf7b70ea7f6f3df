"""Fuzz the server's OpenAPI schema with schemathesis: whatever a client sends, valid or not,
the answer is never a 5xx (a bounded number of cases per operation, on a tiny random base)."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve import LLM
from tests.helpers import make_lora, running_server

# FUZZ_CASES=400 fuzzes deeper (minutes per operation); CI runs the default.
CASES_PER_OPERATION = int(os.environ.get("FUZZ_CASES", "30"))


@pytest.fixture(scope="module")
def fuzzed_schema(tiny_base, tmp_path_factory):
    from serve.async_engine import AsyncLLM
    from serve.serve_config import ServeConfig
    from serve.server import create_app

    root = tmp_path_factory.mktemp("fuzz")
    llm = LLM(
        base_model=str(tiny_base.path),
        quantization=None,
        num_kv_blocks=32,  # a 128-token context: any max_tokens ends quickly
        block_size=4,
        max_lora_rank=8,
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
    )
    llm.load_adapter("faq", str(make_lora(tiny_base, root / "faq", rank=4, targets=["q_proj"])))
    engine = AsyncLLM(llm.engine, max_waiting=64)
    config = ServeConfig(default_max_tokens=8, audit={"path": root / "audit.jsonl"})
    with running_server(create_app(engine, "tiny", config)) as url:
        yield schemathesis.openapi.from_url(url.removesuffix("/v1") + "/openapi.json")
    engine.shutdown()


OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("POST", "/v1/adapters"),
    ("DELETE", "/v1/adapters/{name}"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
]


def test_every_operation_is_fuzzed(fuzzed_schema):
    listed = {(r.ok().method.upper(), r.ok().path) for r in fuzzed_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_fuzzed_requests_never_get_a_server_error(fuzzed_schema, method, path):
    # Random model names are all 404s: most cases name a served model, to reach generation.
    @given(
        case=fuzzed_schema[path][method].as_strategy(),
        model=st.sampled_from(["tiny", "faq", "faq", None]),
    )
    @settings(
        max_examples=CASES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # the same cases on every run
        database=None,
    )
    def call(case, model):
        if model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        response = case.call(timeout=60)
        assert response.status_code < 500, f"{case.method} {case.path}: {response.text[:500]}"

    call()

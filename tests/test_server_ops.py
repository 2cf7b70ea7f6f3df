"""The server's operational side on a tiny random base: API keys, allow-lists, token rate
limits, the audit log, the waiting-queue cap, request timeouts and Prometheus metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import re
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from registry.errors import ConfigError
from serve import LLM
from tests.helpers import hang_up_after, make_lora, paused, running_server, tiny_engine_args

QUESTION = [{"role": "user", "content": "What is the capital of Norway?"}]
IGNORE_EOS = {"ignore_eos": True}
OPS_KEY = "sk-ops-not-a-real-secret"
FAQ_KEY = "sk-faq-not-a-real-secret"


@pytest.fixture(scope="module")
def faq_folder(tiny_base, tmp_path_factory):
    return make_lora(tiny_base, tmp_path_factory.mktemp("ops") / "faq", rank=4, targets=["q_proj"])


@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory) -> str:
    """One empty MLflow store for the module (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('ops-registry') / 'mlflow.db'}"


@contextlib.contextmanager
def serving(tiny_base, faq_folder, registry_uri, tmp_path, max_waiting=None, **settings):
    """uvicorn on 127.0.0.1 over a fresh tiny engine with adapter `faq`; (url, engine)."""
    from serve.async_engine import AsyncLLM
    from serve.serve_config import ServeConfig
    from serve.server import create_app

    llm = LLM(**tiny_engine_args(tiny_base, registry_uri, max_num_seqs=4))
    llm.load_adapter("faq", str(faq_folder))
    engine = AsyncLLM(llm.engine, max_waiting)
    audit = {"path": tmp_path / "audit.jsonl", **settings.pop("audit", {})}
    config = ServeConfig(audit=audit, **settings)
    try:
        with running_server(create_app(engine, "tiny", config)) as url:
            yield url, engine
    finally:
        engine.shutdown()


def _audit(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _wait_until_idle(engine):
    deadline = time.monotonic() + 10
    while (stats := engine.stats())["running"] or stats["waiting"] or stats["kv_blocks_used"]:
        assert time.monotonic() < deadline, f"engine still busy: {stats}"
        time.sleep(0.05)


def test_keys_allow_lists_rate_limits_and_an_audit_line_per_request(
    tiny_base, faq_folder, empty_registry, tmp_path, monkeypatch
):
    monkeypatch.setenv("LORAPLEX_TEST_FAQ_KEY", FAQ_KEY)
    keys = [
        {"id": "ops", "sha256": hashlib.sha256(OPS_KEY.encode()).hexdigest(), "admin": True},
        {
            "id": "faq-team",
            "env": "LORAPLEX_TEST_FAQ_KEY",
            "adapters": ["faq"],
            "tokens_per_minute": 20,
        },
    ]
    with serving(tiny_base, faq_folder, empty_registry, tmp_path, api_keys=keys) as (url, _):

        def client(key):
            return openai.OpenAI(base_url=url, api_key=key, max_retries=0)

        def ask(key, model="faq"):
            return client(key).chat.completions.create(model=model, messages=QUESTION, max_tokens=4)

        assert httpx.get(f"{url}/models").status_code == 401  # no Authorization header
        with pytest.raises(openai.AuthenticationError, match="unknown API key"):
            ask("sk-guessed")
        with pytest.raises(openai.PermissionDeniedError, match="may not use model 'tiny'"):
            ask(FAQ_KEY, model="tiny")
        assert [m.id for m in client(FAQ_KEY).models.list().data] == ["faq"]
        with pytest.raises(openai.PermissionDeniedError, match="may not load or unload"):
            client(FAQ_KEY).post("/adapters", body={"name": "x", "source": "y"}, cast_to=dict)
        with pytest.raises(openai.PermissionDeniedError, match="may not load or unload"):
            body = {"lora_name": "faq", "lora_path": "y"}  # loaded already: 403 all the same
            client(FAQ_KEY).post("/load_lora_adapter", body=body, cast_to=dict)
        with pytest.raises(openai.PermissionDeniedError, match="may not load or unload"):
            client(FAQ_KEY).post("/unload_lora_adapter", body={"lora_name": "faq"}, cast_to=dict)

        raw = client(FAQ_KEY).chat.completions.with_raw_response.create(
            model="faq", messages=QUESTION, max_tokens=4
        )
        served = raw.parse()
        # It spent more than the 20 tokens a minute: the level is 20 - total, and the next
        # request waits until one token has come back, at 1/3 token a second.
        with pytest.raises(openai.RateLimitError) as limited:
            ask(FAQ_KEY)
        wait = 3 * (1 + served.usage.total_tokens - 20)
        assert wait - 10 < int(limited.value.response.headers["retry-after"]) <= wait
        assert ask(OPS_KEY, model="tiny").usage.completion_tokens >= 1  # other keys unaffected

    lines = _audit(tmp_path)
    text = (tmp_path / "audit.jsonl").read_text()
    assert OPS_KEY not in text and FAQ_KEY not in text and "Norway" not in text
    assert [(line["key_id"], line["status"]) for line in lines] == [
        (None, 401),
        (None, 401),
        ("faq-team", 403),
        ("faq-team", 200),
        *[("faq-team", 403)] * 3,  # a load or unload by any route
        ("faq-team", 200),
        ("faq-team", 429),
        ("ops", 200),
    ]
    assert [line["endpoint"] for line in lines[4:7]] == [
        "/v1/adapters",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
    ]
    line = next(x for x in lines if x["request_id"] == raw.headers["x-request-id"])
    assert line["model"] == "faq" and line["endpoint"] == "/v1/chat/completions"
    assert line["prompt_tokens"] == served.usage.prompt_tokens
    assert line["completion_tokens"] == served.usage.completion_tokens
    assert line["adapter_uid"].startswith("faq#") and line["latency_s"] > 0


def test_tokenize_asks_for_a_key_keeps_to_its_allow_list_and_spends_no_budget(
    tiny_base, faq_folder, empty_registry, tmp_path
):
    key = {"id": "faq-team", "sha256": hashlib.sha256(FAQ_KEY.encode()).hexdigest()}
    keys = [{**key, "adapters": ["faq"], "tokens_per_minute": 20}]
    with serving(tiny_base, faq_folder, empty_registry, tmp_path, api_keys=keys) as (url, _):

        def post(route: str, body: dict, key: str | None = FAQ_KEY) -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            root = url.removesuffix("/v1")
            return httpx.post(f"{root}/{route}", json=body, headers=headers).status_code

        long = {"model": "faq", "prompt": "one more word " * 20}  # 20+ tokens, over the budget
        assert post("tokenize", long, key=None) == 401
        assert post("tokenize", {**long, "model": "tiny"}) == 403
        assert [post("tokenize", long) for _ in range(3)] == [200] * 3
        assert post("detokenize", {"model": "faq", "tokens": [1, 2]}) == 200
    lines = [(x["endpoint"], x["key_id"], x["model"], x["status"]) for x in _audit(tmp_path)]
    assert lines == [
        ("/tokenize", None, None, 401),
        ("/tokenize", "faq-team", None, 403),  # a model is recorded once it is known
        *[("/tokenize", "faq-team", "faq", 200)] * 3,
        ("/detokenize", "faq-team", "faq", 200),
    ]


def test_requests_in_flight_hold_their_most_tokens_so_a_burst_cannot_overdraw_a_key(
    tiny_base, faq_folder, empty_registry, tmp_path
):
    key = {"id": "team", "sha256": hashlib.sha256(OPS_KEY.encode()).hexdigest()}
    key["tokens_per_minute"] = 1000  # room for two requests of 400 tokens, and a third begun
    keys = [key]
    with serving(tiny_base, faq_folder, empty_registry, tmp_path, api_keys=keys) as (url, engine):
        client = openai.OpenAI(base_url=url, api_key=OPS_KEY, max_retries=0)

        def ask():
            try:
                client.chat.completions.create(model="faq", messages=QUESTION, max_tokens=400)
                return 200
            except openai.APIStatusError as error:
                return error.status_code

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            with paused(engine):  # none has used a token yet: all four arrive on a full budget
                futures = [pool.submit(ask) for _ in range(4)]
                deadline = time.monotonic() + 20
                while engine._inbox.qsize() < 3 or not any(f.done() for f in futures):
                    assert time.monotonic() < deadline, "no request was refused while queued"
                    time.sleep(0.02)
            assert sorted(f.result() for f in futures) == [200, 200, 200, 429]
    assert sorted(line["status"] for line in _audit(tmp_path)) == [200, 200, 200, 429]


def test_a_full_waiting_queue_gets_503_and_the_queued_requests_finish(
    tiny_base, faq_folder, empty_registry, tmp_path
):
    with serving(tiny_base, faq_folder, empty_registry, tmp_path, max_waiting=2) as (url, engine):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)

        def ask():
            try:
                reply = client.chat.completions.create(
                    model="faq", messages=QUESTION, max_tokens=3, extra_body={"ignore_eos": True}
                )
                return 200, reply.usage.completion_tokens
            except openai.APIStatusError as error:
                return error.status_code, error.response.headers.get("retry-after")

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            with paused(engine):  # three requests queue up behind a held engine
                futures = [pool.submit(ask) for _ in range(3)]
                deadline = time.monotonic() + 20
                while engine._inbox.qsize() < 3:
                    assert time.monotonic() < deadline, "the requests did not reach the engine"
                    time.sleep(0.02)
            results = sorted(f.result() for f in futures)
        assert results[:2] == [(200, 3), (200, 3)]  # the queued ones ran to their length
        assert results[2] == (503, "1")  # Retry-After
        _wait_until_idle(engine)
        assert ask() == (200, 3)


def test_a_request_past_its_timeout_is_aborted_with_504_or_an_error_event(
    tiny_base, faq_folder, empty_registry, tmp_path
):
    with serving(tiny_base, faq_folder, empty_registry, tmp_path, request_timeout_s=2) as (
        url,
        engine,
    ):
        client = openai.OpenAI(base_url=url, api_key="unused")  # default retries
        with paused(engine), pytest.raises(openai.InternalServerError) as timed_out:
            client.chat.completions.create(model="faq", messages=QUESTION, max_tokens=8)
        assert timed_out.value.status_code == 504
        assert "timed out after 2 s" in str(timed_out.value)

        aborted = engine.stats()["requests_aborted"]
        stream = client.chat.completions.create(
            model="faq",
            messages=QUESTION,
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)
        with paused(engine), pytest.raises(openai.APIError, match="timed out after 2 s"):
            for _ in chunks:
                pass
        _wait_until_idle(engine)
        assert engine.stats()["requests_aborted"] == aborted + 1
        samples = _metrics(url)
    # x-should-retry: false kept the client from sending the timed-out request again. The
    # stream's status was 200 (sent with its first chunk): its metrics say how it ended.
    key = (("endpoint", "/v1/chat/completions"), ("model", "faq"), ("status", "504"))
    assert samples[("loraplex_requests_total", key)] == 2
    assert samples.get(("loraplex_request_latency_seconds_count", (("model", "faq"),)), 0) == 0
    assert [line["finish_reason"] for line in _audit(tmp_path)] == ["timeout", "timeout"]


def test_every_choice_of_a_request_past_its_timeout_is_aborted(
    tiny_base, faq_folder, empty_registry, tmp_path
):
    with serving(tiny_base, faq_folder, empty_registry, tmp_path, request_timeout_s=2) as (
        url,
        engine,
    ):
        aborted = engine.stats()["requests_aborted"]
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        body = dict(model="faq", messages=QUESTION, max_tokens=400, n=3)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reply = pool.submit(
                client.chat.completions.create, **body, extra_body={"ignore_eos": True}
            )
            deadline = time.monotonic() + 20
            while engine.stats()["running"] < 3:  # all three generating
                assert time.monotonic() < deadline, "the choices did not start"
                time.sleep(0.01)
            with paused(engine), pytest.raises(openai.InternalServerError, match="after 2 s"):
                reply.result(timeout=30)
        _wait_until_idle(engine)
        assert engine.stats()["requests_aborted"] == aborted + 3


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_hangs_up_on_a_non_streaming_request_aborts_it(
    tiny_base, faq_folder, empty_registry, tmp_path, n
):
    with serving(tiny_base, faq_folder, empty_registry, tmp_path) as (url, engine):
        aborted = engine.stats()["requests_aborted"]
        body = {"model": "faq", "messages": QUESTION, "max_tokens": 400, "ignore_eos": True}
        body["n"] = n  # every choice is aborted
        payload = json.dumps(body).encode()
        host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
        with contextlib.ExitStack() as hold:
            with socket.create_connection((host, int(port))) as client:
                client.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
                    b"Content-Type: application/json\r\n"
                    + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                deadline = time.monotonic() + 20
                while engine.stats()["running"] < n:
                    assert time.monotonic() < deadline, "the request did not start"
                    time.sleep(0.01)
                hold.enter_context(paused(engine))  # it cannot finish now; the client hangs up
            deadline = time.monotonic() + 20
            while not _audit(tmp_path):  # its line is written when the handler ends
                assert time.monotonic() < deadline, "the server did not notice the hang-up"
                time.sleep(0.05)
        _wait_until_idle(engine)
        assert engine.stats()["requests_aborted"] == aborted + n
    [line] = _audit(tmp_path)
    assert (line["status"], line["finish_reason"]) == (499, "abort")
    assert n <= line["completion_tokens"] < 400 * n


def _post_raw(url: str, path: str, body: bytes, sent: int | None = None, rcvbuf: int = 0):
    """POST /v1/`path` on a raw socket, the body cut after `sent` bytes; the socket, unread."""
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    client = socket.socket()
    if rcvbuf:  # a client that reads nothing fills this, then the server's send buffers
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.connect((host, int(port)))
    head = (
        f"POST /v1/{path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    client.sendall(head.encode() + body[:sent])
    return client


def _reply(client: socket.socket) -> bytes:
    """An HTTP response read whole from a raw socket: its head and body may come apart."""
    reply = b""
    while part := client.recv(65536):
        reply += part
        head, _, body = reply.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
        if length and len(body) >= int(length[1]):
            break
    return reply


def _audited(tmp_path, count: int, within: float) -> list[dict]:
    deadline = time.monotonic() + within
    while len(lines := _audit(tmp_path) if (tmp_path / "audit.jsonl").exists() else []) < count:
        assert time.monotonic() < deadline, f"{len(lines)} of {count} requests audited"
        time.sleep(0.05)
    return lines


def test_a_body_that_stalls_gets_408_and_one_its_client_cuts_is_a_hang_up(
    tiny_base, faq_folder, empty_registry, tmp_path
):
    """The engine's deadline starts once the body is read: the body has the same deadline."""
    body = json.dumps({"model": "faq", "prompt": "hi", "max_tokens": 3}).encode()
    with serving(tiny_base, faq_folder, empty_registry, tmp_path, request_timeout_s=1) as (url, _):
        with _post_raw(url, "completions", body, sent=5) as stalled:
            with _post_raw(url, "completions", body, sent=5):
                pass  # hung up mid-body
            stalled.settimeout(10)
            reply = _reply(stalled)
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert b"the request body did not arrive within 1 s" in reply
        lines = _audited(tmp_path, 2, within=10)
    outcomes = sorted((line["status"], line["finish_reason"]) for line in lines)
    assert outcomes == [(408, None), (499, "abort")]  # not FastAPI's 400 for a cut body


def test_serve_gives_requests_in_flight_its_shutdown_timeout_then_exits(tiny_base, tmp_path):
    """SIGTERM with a request still in flight (its body stalled, 60 s from its deadline):
    `loraplex serve` waits `shutdown_timeout_s`, not for the request. (Its base is `.`, the
    folder it runs in: served by the folder's name, which `Path(".").name` made empty.)"""
    import signal
    import subprocess
    import sys

    import yaml

    from serve.server_process import answers

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {
        "base_model": ".",
        "quantization": "none",
        "port": port,
        "request_timeout_s": 60,
        "shutdown_timeout_s": 1,
        "audit": {"path": str(tmp_path / "audit.jsonl")},
        "engine": {"num_kv_blocks": 64, "block_size": 4},
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    loraplex = str(Path(sys.executable).parent / "loraplex")
    server = subprocess.Popen(
        [loraplex, "serve", str(tmp_path / "serve.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tiny_base.path,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        assert answers(f"http://127.0.0.1:{port}/ready", server, 120), server.stdout.read()
        [base] = httpx.get(f"{url}/models").json()["data"]
        assert base["id"] == tiny_base.path.name
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 3}).encode()
        with _post_raw(url, "completions", body, sent=5):
            time.sleep(2)  # the request is in flight (its line below shows it was)
            server.send_signal(signal.SIGTERM)
            started = time.monotonic()
            server.wait(timeout=30)
            seconds = time.monotonic() - started
    finally:
        server.kill()
    assert seconds < 10, server.stdout.read()
    cut = [line for line in _audit(tmp_path) if line["endpoint"] == "/v1/completions"]
    assert [(line["status"], line["finish_reason"]) for line in cut] == [(499, "abort")]


@pytest.mark.parametrize("waiting_on", ["the-engine", "its-body"])
def test_requests_the_shutdown_timeout_cuts_still_write_their_audit_lines(
    tiny_base, empty_registry, tmp_path, waiting_on
):
    """uvicorn cancels what outlives its shutdown timeout and runs the app's shutdown without
    waiting for it: the audit log closed first, and the cut request's line was lost (its
    write raised on the closed file)."""
    from serve.async_engine import AsyncLLM
    from serve.serve_config import ServeConfig
    from serve.server import create_app

    llm = LLM(**tiny_engine_args(tiny_base, empty_registry))
    engine = AsyncLLM(llm.engine)
    app = create_app(engine, "tiny", ServeConfig(audit={"path": tmp_path / "audit.jsonl"}))
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 3}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    parts = [{"type": "http.request", "body": body[:5], "more_body": True}]

    async def receive():
        if waiting_on == "its-body" and not parts:
            await asyncio.Event().wait()  # the rest never comes
        return parts.pop() if parts else {"type": "http.request", "body": body[5:]}

    async def send(message):
        pass

    async def shut_down_with_a_request_in_flight():
        async with app.router.lifespan_context(app):
            request = asyncio.create_task(app(scope, receive, send))
            await asyncio.sleep(0.5)  # in flight: waiting on the held engine
            request.cancel()  # uvicorn's timeout; then its shutdown, at once
        return request

    try:
        with paused(engine):
            request = asyncio.run(shut_down_with_a_request_in_flight())
    finally:
        engine.shutdown()
    assert request.cancelled()
    [line] = _audit(tmp_path)
    assert (line["endpoint"], line["status"], line["finish_reason"]) == (
        "/v1/completions",
        499,
        "abort",
    )


async def _sse_to(send, events, timeout_s: float):
    """`streaming.sse` of `events` to a client that never hangs up; the request's record."""
    from serve import streaming
    from serve.audit import RequestRecord

    record = RequestRecord("req-1", "/v1/chat/completions")
    response = streaming.sse(events, record, timeout_s=timeout_s)

    async def receive():
        await asyncio.Event().wait()

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
    await asyncio.wait_for(response(scope, receive, send), 10)
    return record


def test_a_stream_whose_client_stops_reading_is_cut_and_its_outputs_closed(monkeypatch):
    """The deadline is checked as outputs are read, and a stream's are read as the client
    takes them: one that takes none would hold its requests running and its connection for
    as long as it liked. Its sends wait until the deadline and a grace, then the outputs
    (the requests) are closed."""
    import serve.streaming as streaming

    monkeypatch.setattr(streaming, "SEND_GRACE_S", 0.2)
    closed, sent = [], []

    async def outputs():
        try:
            while True:
                yield {"choices": []}
                await asyncio.sleep(0.01)
        finally:
            closed.append(True)  # what aborts the requests

    async def send(message):
        sent.append(message)
        if len(sent) == 3:  # the headers and two chunks, then nothing is taken
            await asyncio.Event().wait()

    started = time.monotonic()
    record = asyncio.run(_sse_to(send, outputs(), timeout_s=0.3))
    seconds = time.monotonic() - started
    assert closed and record.finish_reason == "timeout"
    assert 0.5 - 0.1 < seconds < 3  # at the deadline and the grace
    assert sent[-1]["more_body"]  # the response was left unfinished: uvicorn drops it


def test_a_stream_that_fails_on_a_bug_ends_with_an_error_event_and_done():
    """An exception other than a timeout or a failed step (a bug) cut the connection: the
    openai client raised httpx's RemoteProtocolError, not an APIError."""
    sent = []

    async def outputs():
        yield {"choices": [{"index": 0}]}
        raise TypeError("a bug")

    async def send(message):
        sent.append(message)

    record = asyncio.run(_sse_to(send, outputs(), timeout_s=30))
    body = b"".join(m.get("body", b"") for m in sent)
    events = [line.removeprefix(b"data: ") for line in body.split(b"\n\n") if line]
    assert events[-1] == b"[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert record.finish_reason == "error"


def test_a_failed_step_is_audited_with_finish_reason_error_and_the_server_goes_on(
    tiny_base, faq_folder, empty_registry, tmp_path
):
    """Before the first token (a 500) and mid-stream (an error event after some chunks)."""
    with serving(tiny_base, faq_folder, empty_registry, tmp_path) as (url, engine):
        runner = engine.engine.runner
        sample = runner.sample
        calls = []

        def fail_at(n):
            def sample_or_fail(plan, forward):
                calls.append(1)
                if len(calls) == n:
                    raise RuntimeError("out of memory (simulated)")
                return sample(plan, forward)

            calls.clear()
            runner.sample = sample_or_fail

        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        try:
            fail_at(1)
            with pytest.raises(openai.InternalServerError, match="simulated"):
                client.chat.completions.create(model="faq", messages=QUESTION, max_tokens=8)
            fail_at(3)
            stream = client.chat.completions.create(
                model="faq", messages=QUESTION, max_tokens=8, stream=True, extra_body=IGNORE_EOS
            )
            chunks = []
            with pytest.raises(openai.APIError, match="simulated"):
                for chunk in stream:
                    chunks.append(chunk)
            assert chunks and all(c.choices[0].finish_reason is None for c in chunks)
        finally:
            runner.sample = sample
        ok = client.chat.completions.create(model="faq", messages=QUESTION, max_tokens=2)
        assert ok.choices[0].finish_reason == "length"
        _wait_until_idle(engine)
        samples = _metrics(url)
    lines = [(line["status"], line["finish_reason"]) for line in _audit(tmp_path)]
    assert lines == [(500, "error"), (200, "error"), (200, "length")]
    # the stream cut by the error is a 500 in the metrics, its latency not an answer's
    chat = ("endpoint", "/v1/chat/completions"), ("model", "faq")
    assert samples[("loraplex_requests_total", (*chat, ("status", "500")))] == 2
    assert samples[("loraplex_requests_total", (*chat, ("status", "200")))] == 1
    assert samples[("loraplex_request_latency_seconds_count", (("model", "faq"),))] == 1


def test_metrics_count_requests_tokens_latencies_and_engine_state(
    tiny_base, faq_folder, empty_registry, tmp_path
):
    with serving(
        tiny_base, faq_folder, empty_registry, tmp_path, audit={"include_prompts": True}
    ) as (url, eng):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        replies = [
            client.chat.completions.create(
                model="faq", messages=QUESTION, max_tokens=6, extra_body={"ignore_eos": True}
            )
            for _ in range(2)
        ]
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=QUESTION,
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no such model", messages=QUESTION)
        loaded = httpx.post(f"{url}/adapters", json={"name": "faq2", "source": str(faq_folder)})
        assert loaded.status_code == 200
        # names a client makes up, refused: audited, but no metrics series of their own
        bad_source = {"name": "made-up-1", "source": str(tmp_path / "nothing")}
        assert httpx.post(f"{url}/adapters", json=bad_source).status_code == 404
        assert httpx.delete(f"{url}/adapters/made-up-2").status_code == 404
        _wait_until_idle(eng)
        m = _metrics(url)
        # An unloaded adapter's series go: names loaded and unloaded for weeks added ~50 each.
        client.chat.completions.create(model="faq2", messages=QUESTION, max_tokens=2)

        def faq2_series() -> int:
            return sum(("model", "faq2") in labels for _, labels in _metrics(url))

        deadline = time.monotonic() + 10
        while not faq2_series():  # recorded as the response ends, perhaps after it arrived
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.delete(f"{url}/adapters/faq2").status_code == 200
        assert faq2_series() == 0

    def value(name, **labels):
        return m.get((name, tuple(sorted(labels.items()))), 0)

    chat = "/v1/chat/completions"
    assert value("loraplex_requests_total", endpoint=chat, model="faq", status="200") == 2
    assert value("loraplex_requests_total", endpoint=chat, model="tiny", status="200") == 1
    assert value("loraplex_requests_total", endpoint=chat, model="none", status="404") == 1
    assert value("loraplex_completion_tokens_total", model="faq") == 12
    prompt_tokens = chunks[-1].usage.prompt_tokens
    assert value("loraplex_prompt_tokens_total", model="faq") == 2 * prompt_tokens
    assert sum(r.usage.prompt_tokens for r in replies) == 2 * prompt_tokens
    assert value("loraplex_time_to_first_token_seconds_count", model="faq") == 2
    assert value("loraplex_request_latency_seconds_count", model="tiny") == 1
    # One inter-token gap per token after the first.
    assert value("loraplex_inter_token_latency_seconds_count", model="faq") == 2 * 5
    assert value("loraplex_inter_token_latency_seconds_count", model="tiny") == 4
    assert value("loraplex_adapter_loads_total", reason="api") == 1
    admin = "/v1/adapters/{name}"
    # admin calls name the adapter as sent: loads and unloads under new names would add
    # series without end (the audit line has the name)
    route = {"endpoint": "/v1/adapters", "model": "none"}
    loads = {s: value("loraplex_requests_total", **route, status=s) for s in ("200", "404")}
    assert loads == {"200": 1, "404": 1}
    assert value("loraplex_requests_total", endpoint=admin, model="none", status="404") == 1
    assert not [labels for _, labels in m if ("model", "made-up-1") in labels]
    assert not [name for name, _ in m if name.endswith("_created")]
    assert value("loraplex_kv_cache_blocks_total") == 128
    assert value("loraplex_kv_cache_blocks_used") == 0
    assert value("loraplex_num_requests_running") == 0
    assert value("loraplex_num_requests_waiting") == 0
    assert value("loraplex_adapter_slot_loads_total") == 1
    assert value("loraplex_adapter_slot_hits_total") == 1  # the second faq request
    assert value("loraplex_prefix_cache_query_blocks_total") > 0
    prompts = [line["prompt"] for line in _audit(tmp_path) if line["status"] == 200][:1]
    assert prompts == [QUESTION]


def _raw_request(url: str, body: dict) -> socket.socket:
    """A request sent on a socket the test closes when it likes (a client hanging up)."""
    payload = json.dumps(body).encode()
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    client = socket.create_connection((host, int(port)))
    client.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return client


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_while_its_request_is_queued_aborts_it(
    tiny_base, faq_folder, empty_registry, tmp_path, stream
):
    with serving(tiny_base, faq_folder, empty_registry, tmp_path) as (url, engine):
        body = {"model": "faq", "prompt": [1, 300, 301], "max_tokens": 200, "stream": stream}
        with paused(engine):  # queued behind a busy engine: no first token yet
            client = _raw_request(url, {**body, "ignore_eos": True})
            deadline = time.monotonic() + 20
            while engine._inbox.qsize() < 1:
                assert time.monotonic() < deadline, "the request did not reach the engine"
                time.sleep(0.02)
            client.close()
            while not _audit(tmp_path):  # noticed while the engine is still held
                assert time.monotonic() < deadline, "the server did not notice the hang-up"
                time.sleep(0.05)
        _wait_until_idle(engine)
        assert not engine.engine.requests
    [line] = _audit(tmp_path)
    assert (line["status"], line["finish_reason"], line["completion_tokens"]) == (499, "abort", 0)


def test_a_stream_its_client_closes_is_audited_and_counted_as_aborted(
    tiny_base, faq_folder, empty_registry, tmp_path
):
    with serving(tiny_base, faq_folder, empty_registry, tmp_path) as (url, engine):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        stream = client.completions.create(
            model="faq",
            prompt=[1, 300],
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        hang_up_after(stream, 4)
        deadline = time.monotonic() + 20
        while not _audit(tmp_path):
            assert time.monotonic() < deadline, "the stream's end was not recorded"
            time.sleep(0.05)
        _wait_until_idle(engine)
        samples = _metrics(url)
    [line] = _audit(tmp_path)
    assert (line["status"], line["finish_reason"]) == (499, "abort")
    assert 3 <= line["completion_tokens"] < 400
    key = (("endpoint", "/v1/completions"), ("model", "faq"), ("status", "499"))
    assert samples[("loraplex_requests_total", key)] == 1


def test_the_choices_of_a_request_run_on_the_version_it_started_with(
    tiny_base, faq_folder, empty_registry, tmp_path
):
    import threading

    folders = [
        make_lora(
            tiny_base,
            tmp_path / f"v{seed}",
            rank=4,
            targets=["q_proj", "v_proj"],
            b_scale=1.0,
            seed=seed,
        )
        for seed in (0, 1)
    ]
    with serving(tiny_base, faq_folder, empty_registry, tmp_path) as (url, engine):
        http = httpx.Client(base_url=url, timeout=60)

        def load(folder):
            return http.post("/adapters", json={"name": "moving", "source": str(folder)}).json()

        body = {"model": "moving", "prompt": [1, 300, 301], "max_tokens": 8, "temperature": 0}
        body.update(n=2, ignore_eos=True)
        first = load(folders[0])
        replies = {}
        with paused(engine):  # the name is replaced before the first choice has its first token
            asking = threading.Thread(
                target=lambda: replies.update(n2=http.post("/completions", json=body))
            )
            asking.start()
            deadline = time.monotonic() + 20
            while engine._inbox.qsize() < 1:  # choice 0 queued
                assert time.monotonic() < deadline, "the request did not reach the engine"
                time.sleep(0.02)
            replacing = threading.Thread(target=lambda: replies.update(new=load(folders[1])))
            replacing.start()
            while engine._inbox.qsize() < 2:  # the new version read, waiting to install
                assert time.monotonic() < deadline, "the replacement did not reach the engine"
                time.sleep(0.02)
        asking.join()
        replacing.join()
        assert replies["new"]["uid"] != first["uid"]
        texts = [choice["text"] for choice in replies["n2"].json()["choices"]]
        after = http.post("/completions", json={**body, "n": 1}).json()["choices"][0]["text"]
    assert texts[0] == texts[1] != after  # one version for both choices; the new one differs
    line = next(
        x for x in _audit(tmp_path) if x["request_id"] == replies["n2"].headers["x-request-id"]
    )
    assert line["adapter_uid"] == first["uid"]


def test_an_unreachable_registry_leaves_the_model_list_and_refusals_prompt(
    tiny_base, faq_folder, tmp_path, caplog
):
    """... and the log says why without the registry's password (MLflow's errors quote its
    URL, basic auth included)."""
    import logging
    import os

    caplog.set_level(logging.INFO)

    limits = (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    )
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        unreachable = f"http://alice:s3cret@127.0.0.1:{s.getsockname()[1]}"
    saved = {name: os.environ.pop(name, None) for name in limits}  # MLflow's defaults
    try:
        with serving(tiny_base, faq_folder, unreachable, tmp_path) as (url, _):
            t0 = time.monotonic()
            listed = httpx.get(f"{url}/models", timeout=30)
            assert [m["id"] for m in listed.json()["data"]] == ["tiny", "faq"]
            # One not loaded may yet be registered: the registry's answer is missing, not "no"
            assert httpx.get(f"{url}/models/other", timeout=30).status_code == 503
            assert httpx.get(f"{url}/models/faq", timeout=30).status_code == 200
            assert httpx.get(f"{url}/models/no such", timeout=30).status_code == 404
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
            with pytest.raises(openai.InternalServerError, match="registry") as refused:
                client.chat.completions.create(model="faq@champion", messages=QUESTION)
            assert refused.value.status_code == 503
            # An admin load by reference is refused the same way, and `faq` served as before.
            loaded = httpx.post(
                f"{url}/adapters", json={"name": "faq", "source": "faq@champion"}, timeout=30
            )
            assert loaded.status_code == 503 and loaded.headers["retry-after"] == "10"
            assert loaded.json()["error"]["code"] == "registry_unavailable"
            assert client.chat.completions.create(model="faq", messages=QUESTION, max_tokens=2)
            assert time.monotonic() - t0 < 30  # MLflow's own retries alone take minutes
        assert "cannot list the registry http://alice:***@" in caplog.text
        assert "cannot load faq@champion from the registry" in caplog.text
        assert "s3cret" not in caplog.text
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def test_the_base_name_is_refused_as_an_adapter_and_a_versioned_name_is_unloaded(
    tiny_base, faq_folder, empty_registry, tmp_path
):
    with serving(tiny_base, faq_folder, empty_registry, tmp_path) as (url, engine):
        http = httpx.Client(base_url=url, timeout=60)
        shadowing = http.post("/adapters", json={"name": "tiny", "source": str(faq_folder)})
        assert shadowing.status_code == 400 and shadowing.json()["error"]["param"] == "name"
        for name, says in (("bad name", "must be a name"), ("faq@v2", "reserved by MLflow")):
            refused = http.post("/adapters", json={"name": name, "source": str(faq_folder)})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "name"
            assert says in refused.json()["error"]["message"]
        assert [m["parent"] for m in http.get("/models").json()["data"] if m["id"] == "tiny"] == [
            None
        ]
        # The name a reference loads under on first use (faq/3), here from a folder.
        assert http.post("/adapters", json={"name": "faq/3", "source": str(faq_folder)}).is_success
        unloaded = http.delete("/adapters/faq/3")
        assert unloaded.status_code == 200 and unloaded.json()["name"] == "faq/3"
        assert "faq/3" not in engine.engine.adapters
        # A name the registry does not hold: its URI (a password, maybe) and the names it
        # holds stay in the server's log.
        unknown = http.post("/adapters", json={"name": "x", "source": "nope@champion"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["message"] == "no registered adapter named 'nope'"
        lines = [x for x in _audit(tmp_path) if x["endpoint"].startswith("/v1/adapters")]
        admin = [(x["endpoint"], x["model"], x["status"]) for x in lines]
        assert admin == [  # admin lines name the adapter they load or unload
            ("/v1/adapters", "tiny", 400),
            ("/v1/adapters", None, 400),  # a body refused before its name is read
            ("/v1/adapters", None, 400),
            ("/v1/adapters", "faq/3", 200),
            ("/v1/adapters/{name}", "faq/3", 200),
            ("/v1/adapters", "x", 404),
        ]
        # Nor can a server start with an adapter under the base's name.
        from serve.serve_config import ServeConfig
        from serve.server import create_app

        asyncio.run(engine.load_adapter("tiny", str(faq_folder)))
        with pytest.raises(ConfigError, match="the base model's name"):
            create_app(engine, "tiny", ServeConfig(audit={"path": tmp_path / "other.jsonl"}))


def test_model_lists_waiting_on_a_hung_registry_hold_up_no_completion(
    tiny_base, faq_folder, empty_registry, tmp_path, monkeypatch
):
    import os
    import threading

    from registry.store import AdapterRegistry

    released, calls = threading.Event(), []

    def hung(self):  # a registry host that drops packets: each call waits out its timeouts
        calls.append(1)
        released.wait(60)
        return []

    monkeypatch.setattr(AdapterRegistry, "list", hung)
    lists = min(32, (os.cpu_count() or 1) + 4) + 2  # more than the loop's default threads
    with serving(tiny_base, faq_folder, empty_registry, tmp_path) as (url, _):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=10)
        try:
            with concurrent.futures.ThreadPoolExecutor(lists) as pool:
                listed = [pool.submit(httpx.get, f"{url}/models", timeout=60) for _ in range(lists)]
                deadline = time.monotonic() + 20
                while not calls:
                    assert time.monotonic() < deadline, "the model list did not ask the registry"
                    time.sleep(0.02)
                time.sleep(1)  # the other lists arrive meanwhile
                reply = client.chat.completions.create(model="faq", messages=QUESTION, max_tokens=2)
                assert reply.usage.completion_tokens >= 1
                assert client.completions.create(model="faq", prompt="Hi", max_tokens=2)
                assert len(calls) == 1  # one registry call for all the lists waiting
        finally:
            released.set()
        assert all(f.result().status_code == 200 for f in listed)


@pytest.mark.parametrize("server_fails", [True, False])
def test_a_stream_cut_by_a_server_error_is_an_error_and_one_cut_by_its_client_a_hang_up(
    server_fails,
):
    from serve.audit import RecordRequests
    from serve.metrics import ServerMetrics

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        if server_fails:
            raise RuntimeError("a bug mid-stream")
        # else the client went away: the app stops sending without a last body part

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    records = []
    scope = {"type": "http", "path": "/v1/completions", "method": "POST"}
    with pytest.raises(RuntimeError) if server_fails else contextlib.nullcontext():
        asyncio.run(RecordRequests(app, records.append, set())(scope, receive, send))
    [record] = records
    metrics = ServerMetrics()
    metrics.observe(record)
    labels = {"endpoint": "/v1/completions", "model": "none"}
    labels["status"] = "500" if server_fails else "499"
    assert metrics.registry.get_sample_value("loraplex_requests_total", labels) == 1
    expected = (200, "error") if server_fails else (499, "abort")
    assert (record.status, record.finish_reason) == expected

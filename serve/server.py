"""OpenAI-compatible REST server over the async engine; the `model` field picks the adapter.

`model` is the base model's name, a loaded adapter, or a registry reference (`name`,
`name@alias`, `name/3`) that is loaded on first use without a restart.

Refusals and what OpenAI's clients do with them: 400/404 (not retried); 401/403 for keys and
allow-lists; 429 with Retry-After (retried after that delay); 503 when `max_waiting` requests
are queued (retried with back-off); 504 when a request outlives `request_timeout_s` (marked
`x-should-retry: false`, since it would only time out again). A stream that times out ends
with an error event, which the openai client raises as `APIError`: an answer cut short is
never passed off as a finished one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from registry.errors import NotFoundError
from registry.refs import is_ref
from serve.adapter_watch import AdapterWatch
from serve.api_keys import ApiKeys
from serve.async_engine import AsyncLLM, QueueFull
from serve.audit import SCOPE_KEY, AuditLog, RecordRequests, RequestRecord
from serve.metrics import CONTENT_TYPE, ServerMetrics
from serve.openai_logprobs import ChatLogprobs, CompletionLogprobs, LogprobsFormatter
from serve.outputs import RequestOutput
from serve.protocol import (
    AdapterLoad,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    new_id,
    now,
)
from serve.refusal import Refusal, timed_out
from serve.serve_config import ServeConfig
from serve.streaming import (
    all_started,
    chat_chunks,
    completion_chunks,
    last_outputs,
    observed,
    sse,
    until,
    usage,
)


async def _authenticated(request: Request) -> RequestRecord:
    """The request's record, with its caller (401 for a missing or unknown key)."""
    record = request.scope[SCOPE_KEY]
    record.caller = request.app.state.keys.caller(request.headers.get("authorization"))
    record.key_id = record.caller.id
    return record


Authenticated = Annotated[RequestRecord, Depends(_authenticated)]


_DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is there


def create_app(engine: AsyncLLM, base_name: str, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    tokenizer = engine.engine.tokenizer
    logprobs = LogprobsFormatter(tokenizer)
    metrics = ServerMetrics()
    keys = ApiKeys(config.api_keys)
    adapters = AdapterWatch(engine, lambda reason: metrics.adapter_loads.labels(reason).inc())
    audit = AuditLog(
        config.audit.path or engine.engine.home.root / "audit.jsonl", config.audit.include_prompts
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        follower = asyncio.create_task(adapters.follow(config.alias_poll_interval_s))
        yield
        follower.cancel()
        audit.close()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)

    def finished(record: RequestRecord) -> None:
        metrics.observe(record)
        if record.caller is not None:
            keys.charge(record.caller, record.prompt_tokens + record.completion_tokens)
        audit.write(record)

    app.add_middleware(RecordRequests, on_finish=finished)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(
            error_body(f"{field}: {first['msg']}", "invalid_request_error", field), status_code=400
        )

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, error: NotFoundError):
        return JSONResponse(
            error_body(str(error), "not_found_error", "model", "model_not_found"), status_code=404
        )

    @app.exception_handler(ValueError)  # UsageError and SamplingParams' checks
    async def _bad_value(request: Request, error: ValueError):
        return JSONResponse(error_body(str(error), "invalid_request_error"), status_code=400)

    @app.exception_handler(Refusal)
    async def _refused(request: Request, error: Refusal):
        return JSONResponse(
            error_body(str(error), error.kind, None, error.code),
            status_code=error.status,
            headers=error.headers,
        )

    @app.exception_handler(QueueFull)
    async def _overloaded(request: Request, error: QueueFull):
        return JSONResponse(
            error_body(f"server overloaded: {error}", "server_overloaded", None, "queue_full"),
            status_code=503,
            headers={"Retry-After": "1"},
        )

    async def adapter_for(model: str) -> str | None:
        """The adapter a request's `model` names (None: the base), loaded on first use."""
        if model == base_name:
            return None
        if model in adapters.loaded:
            return model
        if not is_ref(model):
            raise NotFoundError(f"model {model!r} does not exist (base: {base_name!r})")
        await adapters.ensure(model)
        return model

    async def start(record: RequestRecord, body, prompts: list) -> list[AsyncIterator]:
        """Queue each choice (`n` per prompt, in order) on the request's adapter; their outputs,
        once each has its first (so a refusal is an error status, not a broken stream), cut
        at the request's deadline. One refused choice aborts the others.

        A prompt's other choices are queued once its first has its first token: its prompt's
        full blocks are then in the prefix cache, so they compute only the rest (n prefills
        become one, and the first choice streams meanwhile)."""
        loop = asyncio.get_running_loop()
        elapsed = time.monotonic() - record.started
        deadline = loop.time() + config.request_timeout_s - elapsed
        params = body.choice_params(config.default_max_tokens)
        try:
            async with asyncio.timeout_at(deadline):
                adapter = await adapter_for(body.model)
                record.model = body.model
                info = adapters.loaded.get(adapter) if adapter else None  # None if unloaded
                record.adapter_uid = info.uid if info else None
                itl = metrics.itl.labels(body.model)
                n = len(params)

                def queue(i: int, j: int) -> AsyncIterator[RequestOutput]:
                    k = i * n + j  # the choice's index in the response
                    rid = record.request_id + (f"-{k}" if k else "")
                    outputs = engine.generate(prompts[i], params[j], adapter, rid)
                    return observed(outputs, record, itl, counts_prompt=j == 0)

                firsts = await all_started([queue(i, 0) for i in range(len(prompts))])
                try:
                    others = await all_started(
                        [queue(i, j) for i in range(len(prompts)) for j in range(1, n)]
                    )
                except BaseException:
                    for stream in firsts:
                        await stream.aclose()
                    raise
                streams = [
                    firsts[i] if j == 0 else others[i * (n - 1) + j - 1]
                    for i in range(len(prompts))
                    for j in range(n)
                ]
                return [until(s, deadline, record) for s in streams]
        except TimeoutError:
            record.finish_reason = "timeout"
            raise timed_out(config.request_timeout_s) from None

    async def last(request: Request, streams: list[AsyncIterator]) -> list[RequestOutput]:
        """The final output of each choice. A client that hangs up first aborts the request
        (the streams' end frees their KV blocks), as a streaming client does by closing the
        stream."""
        finals = asyncio.ensure_future(last_outputs(streams))
        try:
            while not (await asyncio.wait({finals}, timeout=_DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    request.scope[SCOPE_KEY].finish_reason = "abort"
                    raise Refusal(499, "client closed the request", "client_closed_request")
            return finals.result()
        except TimeoutError:
            raise timed_out(config.request_timeout_s) from None
        finally:
            finals.cancel()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus():
        stats = await asyncio.wait_for(engine.stats_async(), 30) if engine.alive else {}
        return Response(metrics.render(stats), media_type=CONTENT_TYPE)

    @app.post("/v1/adapters")
    async def load_adapter(record: Authenticated, body: AdapterLoad):
        keys.require_admin(record.caller)
        info = await adapters.load(body.name, body.source)
        return _adapter_entry(info, base_name)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(record: Authenticated, name: str):
        keys.require_admin(record.caller)
        await engine.unload_adapter(name)
        return {"name": name, "unloaded": True}

    @app.get("/v1/models")
    async def models(record: Authenticated):
        entries = {base_name: _model_entry(base_name, base_name)}
        for name, info in sorted(adapters.loaded.items()):
            entries[name] = _adapter_entry(info, base_name)
        for registered in await adapters.registered():
            refs = [registered.name, *(f"{registered.name}@{a}" for a in registered.aliases)]
            for ref in refs:
                entries.setdefault(ref, {**_model_entry(ref, base_name), "loaded": False})
        visible = [entry for entry in entries.values() if record.caller.may_use(entry["id"])]
        return {"object": "list", "data": visible}

    @app.post("/v1/chat/completions")
    async def chat(request: Request, record: Authenticated, body: ChatCompletionRequest):
        keys.admit(record.caller, body.model)
        messages = [m.for_template() for m in body.messages]
        record.prompt = messages
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        if body.max_completion_tokens:
            body.max_tokens = body.max_completion_tokens
        streams = await start(record, body, [prompt])
        rid = new_id("chatcmpl")
        scores = [ChatLogprobs(logprobs) for _ in streams]
        if body.stream:
            return sse(chat_chunks(streams, rid, body, scores), config.request_timeout_s)
        finals = await last(request, streams)
        choices = [
            {
                "index": k,
                "finish_reason": final.finish_reason,
                "message": {"role": "assistant", "content": final.text},
                "logprobs": scores[k].take(final),
            }
            for k, final in enumerate(finals)
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now(),
            "model": body.model,
            "choices": choices,
            "usage": usage(finals, body.n).model_dump(),
        }

    @app.post("/v1/completions")
    async def completions(request: Request, record: Authenticated, body: CompletionRequest):
        keys.admit(record.caller, body.model)
        record.prompt = body.prompt
        prompts = body.prompts()
        streams = await start(record, body, prompts)
        rid = new_id("cmpl")
        # Per choice: its prompt's text (echoed, and where logprob offsets count from).
        texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
        texts = [text for text in texts for _ in range(body.n)]
        scores = [CompletionLogprobs(logprobs, text, body.echo) for text in texts]
        echo = texts if body.echo else [""] * len(texts)
        if body.stream:
            chunks = completion_chunks(streams, rid, body, echo, scores)
            return sse(chunks, config.request_timeout_s)
        finals = await last(request, streams)
        choices = [
            {
                "index": k,
                "text": echo[k] + final.text,
                "finish_reason": final.finish_reason,
                "logprobs": scores[k].take(final),
            }
            for k, final in enumerate(finals)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": now(),
            "model": body.model,
            "choices": choices,
            "usage": usage(finals, body.n).model_dump(),
        }

    app.state.keys = keys
    app.state.metrics = metrics
    app.state.adapters = adapters
    return app


def _model_entry(name: str, base_name: str) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "loraplex",
        "root": base_name,
        "parent": None if name == base_name else base_name,
    }


def _adapter_entry(info, base_name: str) -> dict:
    return {
        **_model_entry(info.name, base_name),
        "loaded": True,
        "uid": info.uid,
        "source": info.source,
        "version": info.version,
        "rank": info.rank,
        "modules": info.modules,
    }

"""OpenAI-compatible REST server over the async engine; the `model` field picks the adapter.

`model` is the base model's name, a loaded adapter, or a registry reference (`name`,
`name@alias`, `name/3`) that is loaded on first use without a restart.

Refusals and what OpenAI's clients do with them: 400/404 (not retried); 401/403 for keys and
allow-lists; 429 with Retry-After (retried after that delay); 503 when `max_waiting` requests
are queued (retried with back-off); 504 when a request outlives `request_timeout_s` (marked
`x-should-retry: false`, since it would only time out again). A stream that times out ends
with an error event, which the openai client raises as `APIError`: an answer cut short is
never passed off as a finished one. 413 for a body over the limit, 500 (`server_error`) for a
failed engine step; a client that hangs up, queued or mid-answer, aborts its request (499).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from registry.config_file import is_union_member
from registry.errors import ConfigError, NotFoundError, UnknownAdapterError, UsageError
from registry.refs import is_ref
from serve.adapter_watch import AdapterWatch
from serve.api_keys import ApiKeys
from serve.async_engine import AsyncLLM, EngineStepError, QueueFull
from serve.audit import SCOPE_KEY, AuditLog, RecordRequests, RequestRecord
from serve.body_limit import LimitBody
from serve.metrics import CONTENT_TYPE, ServerMetrics
from serve.openai_logprobs import ChatLogprobs, CompletionLogprobs, LogprobsFormatter
from serve.outputs import RequestOutput
from serve.protocol import (
    AdapterLoad,
    ChatCompletionRequest,
    CompletionRequest,
    InvalidField,
    error_body,
    new_id,
    now,
)
from serve.refusal import Refusal, registry_unavailable, timed_out
from serve.serve_config import ServeConfig
from serve.streaming import (
    all_started,
    chat_chunks,
    completion_chunks,
    last_outputs,
    observed,
    prompt_only,
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


log = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.5  # how often a request not streaming yet checks that its client is there
# Text prompts are refused past this many characters per token of the context length, before
# tokenizing (which costs in proportion): tokenizers average 3-5 characters per token.
_CHARS_PER_TOKEN_BOUND = 16
# Request bodies are refused past this many bytes per character of that bound (JSON escapes
# take up to 6 bytes a character; a batch holds several prompts), and never below 16 MiB.
_BODY_BYTES_PER_CHAR = 64
_MIN_BODY_BYTES = 16 * 2**20


def create_app(engine: AsyncLLM, base_name: str, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    tokenizer = engine.engine.tokenizer
    logprobs = LogprobsFormatter(tokenizer)
    metrics = ServerMetrics()
    keys = ApiKeys(config.api_keys)
    adapters = AdapterWatch(engine, lambda reason: metrics.adapter_loads.labels(reason).inc())
    if base_name in adapters.loaded:  # requests for it would get the base: never served
        raise ConfigError(f"adapter {base_name!r}: the base model's name cannot name an adapter")
    audit = AuditLog(
        config.audit.path or engine.engine.home.root / "audit.jsonl", config.audit.include_prompts
    )
    # Prompts are tokenized on threads of their own: registry calls, which can hang for as
    # long as the registry is unreachable, hold the loop's default threads.
    tokenizing = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="asyncio-tokenize")
    listing: asyncio.Future | None = None  # the registry's adapters, asked once for all callers

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        follower = asyncio.create_task(adapters.follow(config.alias_poll_interval_s))
        yield
        follower.cancel()
        tokenizing.shutdown(wait=False, cancel_futures=True)
        audit.close()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)

    def finished(record: RequestRecord) -> None:
        metrics.observe(record)
        if record.caller is not None:
            used = record.prompt_tokens + record.completion_tokens
            keys.settle(record.caller, record.reserved_tokens, used)
        audit.write(record)

    max_chars = engine.engine.max_model_len * _CHARS_PER_TOKEN_BOUND
    app.add_middleware(LimitBody, max_bytes=max(_MIN_BODY_BYTES, _BODY_BYTES_PER_CHAR * max_chars))
    app.add_middleware(RecordRequests, on_finish=finished)  # outside: it records the 413s too

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        # The deepest error: of a union's branches, the one that got furthest (an image part
        # fails `str` at the content, and `list[TextPart]` at the part's type).
        first = max(error.errors(), key=lambda e: len(e["loc"]))
        field = ".".join(str(p) for p in first["loc"] if p != "body" and not is_union_member(p))
        return JSONResponse(
            error_body(f"{field}: {first['msg']}", "invalid_request_error", field), status_code=400
        )

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException):
        message = error.detail  # Starlette's own: unknown routes (404), methods (405), 413
        if error.status_code in (404, 405):
            message = f"{error.detail}: {request.method} {request.url.path}"
        return JSONResponse(
            error_body(message, "invalid_request_error"),
            status_code=error.status_code,
            headers=error.headers,
        )

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, error: NotFoundError):
        return JSONResponse(
            error_body(str(error), "invalid_request_error", "model", "model_not_found"),
            status_code=404,
        )

    # The request's own mistakes only: any other ValueError is a bug, a 500 (RecordRequests).
    @app.exception_handler(UsageError)
    async def _bad_value(request: Request, error: UsageError):
        code = getattr(error, "code", None)  # InvalidField's
        return JSONResponse(
            error_body(str(error), "invalid_request_error", error.param, code), status_code=400
        )

    @app.exception_handler(EngineStepError)
    async def _step_failed(request: Request, error: EngineStepError):
        request.scope[SCOPE_KEY].finish_reason = "error"
        message = f"the engine step computing this request failed: {error}"
        return JSONResponse(
            error_body(message, "server_error", None, "engine_step_failed"), status_code=500
        )

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

    async def tokenized(function, *args) -> list[int]:
        """Off the event loop (other streams go on) and off the engine thread (steps go on)."""
        return await asyncio.get_running_loop().run_in_executor(tokenizing, function, *args)

    async def registered():
        """The registry's adapters; callers that ask while a listing runs share it, so a slow
        registry holds one thread, not one per caller."""
        nonlocal listing
        if listing is None or listing.done():
            listing = asyncio.ensure_future(adapters.registered())
        return await asyncio.shield(listing)

    async def adapter_for(model: str) -> str | None:
        """The adapter a request's `model` names (None: the base), loaded on first use."""
        if model == base_name:
            return None
        if model in adapters.loaded:
            return model
        missing = f"model {model!r} does not exist: not the base ({base_name!r}), a loaded adapter"
        if not is_ref(model):
            raise NotFoundError(f"{missing} or a registry reference")
        try:
            await adapters.ensure(model)
        except UnknownAdapterError as error:  # its URI and the names registered stay in the log
            log.info("model %r: %s", model, error)
            raise NotFoundError(f"{missing} or a registered adapter") from None
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
        n = body.n
        if engine.max_waiting is not None and len(prompts) * n > engine.max_waiting:
            raise InvalidField(
                "prompt" if len(prompts) > 1 else "n",
                f"{len(prompts)} prompt(s) x n={n} are more requests than can ever queue at "
                f"once (max_waiting: {engine.max_waiting})",
            )
        field = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        params = [body.choice_params(max_tokens_for(body, len(p), field)) for p in prompts]
        most = sum(len(p) + n * ps[0].max_tokens for p, ps in zip(prompts, params, strict=True))
        record.reserved_tokens = keys.reserve(record.caller, most)
        try:
            async with asyncio.timeout_at(deadline):
                adapter = await adapter_for(body.model)
                record.model = body.model
                info = adapters.loaded.get(adapter) if adapter else None  # None if unloaded
                # Every choice on this version, even if the name is replaced meanwhile (the
                # engine refuses an unloaded name when the uid is None).
                uid = record.adapter_uid = info.uid if info else None
                itl = metrics.itl.labels(body.model)

                def queue(i: int, j: int) -> AsyncIterator[RequestOutput]:
                    k = i * n + j  # the choice's index in the response
                    rid = record.request_id + (f"-{k}" if k else "")
                    outputs = engine.generate(prompts[i], params[i][j], adapter, rid, uid)
                    if body.max_tokens == 0:
                        outputs = prompt_only(outputs)
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

    async def unless_gone(request: Request, work: Awaitable):
        """`work`'s result; a client that hangs up first cancels it, which aborts its
        requests (their streams' end frees their KV blocks), and gets 499, as a streaming
        client does by closing the stream."""
        task = asyncio.ensure_future(work)
        try:
            while not (await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected() and not task.done():
                    request.scope[SCOPE_KEY].finish_reason = "abort"
                    raise Refusal(499, "client closed the request", "client_closed_request")
            return task.result()
        finally:
            task.cancel()

    async def last(request: Request, streams: list[AsyncIterator]) -> list[RequestOutput]:
        """The final output of each choice (aborted if the client hangs up first)."""
        try:
            return await unless_gone(request, last_outputs(streams))
        except TimeoutError:
            raise timed_out(config.request_timeout_s) from None

    def max_tokens_for(body, prompt_tokens: int, field: str) -> int:
        """The request's `max_tokens` for one prompt: refused (as vLLM and OpenAI do) if it
        cannot fit the context with the prompt, so a reply is never cut by the context while
        `length` says it was cut by `max_tokens`; if not given, the default or the room left."""
        context = engine.engine.max_model_len
        room = context - prompt_tokens
        if room < 1:
            raise InvalidField(
                field,
                f"the prompt has {prompt_tokens} tokens; the context length is {context}, "
                "with room for at least one output token",
                "context_length_exceeded",
            )
        if body.max_tokens is None:
            return min(config.default_max_tokens, room)
        if body.max_tokens > room:
            raise InvalidField(
                "max_tokens",
                f"{body.max_tokens} is too large: the context length is {context} tokens and "
                f"the prompt has {prompt_tokens}, leaving room for {room}",
                "context_length_exceeded",
            )
        if body.max_tokens == 0 and not getattr(body, "echo", False):
            raise InvalidField("max_tokens", "0 is only allowed with echo (to score the prompt)")
        return max(body.max_tokens, 1)  # 0: one token is computed, and not returned

    def check_length(field: str, chars: int) -> None:
        """Refuse text that cannot fit the context before tokenizing it."""
        if chars > max_chars:
            raise InvalidField(
                field,
                f"{chars} characters cannot fit the context length of "
                f"{engine.engine.max_model_len} tokens (at most {max_chars} characters)",
            )

    def chat_prompt(messages: list[dict]) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except TemplateError as error:  # the template's raise_exception: roles, order
            raise InvalidField("messages", f"the chat template refused them: {error}") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(prompt: str) -> list[int]:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]  # as add_request does

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
        from mlflow.exceptions import MlflowException

        keys.require_admin(record.caller)
        record.model = body.name
        if body.name == base_name:
            raise InvalidField("name", f"{base_name!r} is the base model's name")
        try:
            info = await adapters.load(body.name, body.source)
        except MlflowException as error:  # as on first use: its URI stays in the log
            log.warning("cannot load %s from the registry: %s", body.source, error)
            raise registry_unavailable() from None
        return _adapter_entry(info, base_name)

    # :path, as names loaded by reference hold '/' (name/3)
    @app.delete("/v1/adapters/{name:path}")
    async def unload_adapter(record: Authenticated, name: str):
        keys.require_admin(record.caller)
        record.model = name
        await engine.unload_adapter(name)
        return {"name": name, "unloaded": True}

    async def model_entries(record: RequestRecord) -> dict[str, dict]:
        """The base, loaded adapters and registered ones not loaded yet, that the caller may
        use, by id."""
        entries = {base_name: _model_entry(base_name, base_name)}
        for name, info in sorted(adapters.loaded.items()):
            entries[name] = _adapter_entry(info, base_name)
        for adapter in await registered():
            refs = [adapter.name, *(f"{adapter.name}@{a}" for a in adapter.aliases)]
            for ref in refs:
                entries.setdefault(ref, {**_model_entry(ref, base_name), "loaded": False})
        return {k: entry for k, entry in entries.items() if record.caller.may_use(k)}

    @app.get("/v1/models")
    async def models(record: Authenticated):
        return {"object": "list", "data": list((await model_entries(record)).values())}

    @app.get("/v1/models/{model:path}")  # :path, as references hold '/' (name/3)
    async def model(record: Authenticated, model: str):
        entry = (await model_entries(record)).get(model)
        if entry is None:
            raise NotFoundError(f"model {model!r} does not exist")
        return entry

    @app.post("/v1/chat/completions")
    async def chat(request: Request, record: Authenticated, body: ChatCompletionRequest):
        keys.admit(record.caller, body.model)
        messages = [m.for_template() for m in body.messages]
        record.prompt = messages
        check_length("messages", sum(len(m["content"]) for m in messages))
        prompt = await tokenized(chat_prompt, messages)
        if body.max_completion_tokens:
            body.max_tokens = body.max_completion_tokens
        streams = await unless_gone(request, start(record, body, [prompt]))
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
        given = body.prompts()
        for prompt in given:
            if isinstance(prompt, str):
                check_length("prompt", len(prompt))
        prompts = [await tokenized(encode, p) if isinstance(p, str) else p for p in given]
        streams = await unless_gone(request, start(record, body, prompts))
        rid = new_id("cmpl")
        # Per choice: its prompt's text (echoed, and where logprob offsets count from).
        texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in given]
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
        "data_hash": info.data_hash,
    }

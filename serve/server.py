"""OpenAI-compatible REST server over the async engine; the `model` field picks the adapter.

`model` is the base model's name, a loaded adapter, or one loaded on first use without a
restart: a folder's name in `adapter_dir`, a registry reference (`name`, `name@alias`,
`name/3`).

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
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from registry.errors import ConfigError, NotFoundError, UsageError
from serve.adapter_catalog import AdapterInfo
from serve.adapter_watch import AdapterWatch
from serve.api_keys import ApiKeys
from serve.async_engine import AsyncLLM
from serve.audit import SCOPE_KEY, AuditLog, RecordRequests, RequestRecord
from serve.body_limit import LimitBody
from serve.error_handlers import install_error_handlers
from serve.metrics import CONTENT_TYPE, ServerMetrics
from serve.model_list import ModelList
from serve.openai_logprobs import ChatLogprobs, CompletionLogprobs, LogprobsFormatter
from serve.openai_serving import OpenAIServing
from serve.prompt_reader import PromptReader
from serve.protocol import (
    AdapterLoad,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    InvalidField,
    LoraAdapterLoad,
    LoraAdapterUnload,
    TokenizeRequest,
    new_id,
    now,
)
from serve.serve_config import ServeConfig
from serve.streaming import (
    chat_chunks,
    completion_chunks,
    sse,
    usage,
)


async def _authenticated(request: Request) -> RequestRecord:
    """The request's record, with its caller (401 for a missing or unknown key)."""
    record = request.scope[SCOPE_KEY]
    record.caller = request.app.state.keys.caller(request.headers.get("authorization"))
    record.key_id = record.caller.id
    return record


Authenticated = Annotated[RequestRecord, Depends(_authenticated)]


# How long a shutdown waits for the requests uvicorn cut to end: a cancelled one ends on its
# task's next run, so this is a bound for a bug, not a wait.
DRAIN_S = 5.0
# Request bodies are refused past this many bytes per character a prompt may hold (JSON escapes
# take up to 6 bytes a character; a batch holds several prompts), and never below 16 MiB.
_BODY_BYTES_PER_CHAR = 64
_MIN_BODY_BYTES = 16 * 2**20


def create_app(engine: AsyncLLM, base_name: str, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    tokenizer = engine.engine.tokenizer
    logprobs = LogprobsFormatter(tokenizer)
    metrics = ServerMetrics()
    keys = ApiKeys(config.api_keys)
    adapters = AdapterWatch(
        engine,
        lambda reason: metrics.adapter_loads.labels(reason).inc(),
        metrics.forget,
        config.adapter_dir,
    )
    model_list = ModelList(adapters, base_name)
    reader = PromptReader(tokenizer, engine.engine.max_model_len, config.default_max_tokens)
    if base_name in adapters.loaded:  # requests for it would get the base: never served
        raise ConfigError(f"adapter {base_name!r}: the base model's name cannot name an adapter")
    serving = OpenAIServing(
        engine, base_name, adapters, reader, keys, metrics, config.request_timeout_s
    )
    audit = AuditLog(config.audit_path(engine.engine.home), config.audit.include_prompts)
    in_flight: set[str] = set()  # request ids: RecordRequests' own

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        follow = adapters.follow(config.alias_poll_interval_s, config.first_use_idle_s)
        follower = asyncio.create_task(follow)
        yield
        follower.cancel()
        # uvicorn cancels the requests still running at its shutdown timeout, and goes on
        # without waiting for them: they end, and write their audit lines, meanwhile.
        deadline = time.monotonic() + DRAIN_S
        while in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        serving.close()
        audit.close()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)

    def finished(record: RequestRecord) -> None:
        metrics.observe(record)
        if record.caller is not None:
            used = record.prompt_tokens + record.completion_tokens
            keys.settle(record.caller, record.reserved_tokens, used)
        audit.write(record)

    max_bytes = max(_MIN_BODY_BYTES, _BODY_BYTES_PER_CHAR * reader.max_chars)
    app.add_middleware(LimitBody, max_bytes=max_bytes, timeout_s=config.request_timeout_s)
    # outside: it records the 413s too
    app.add_middleware(RecordRequests, on_finish=finished, in_flight=in_flight)

    install_error_handlers(app)

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

    async def load(
        record: RequestRecord,
        name: str,
        source: str,
        fields: tuple[str, str],  # the request's fields holding the name and the source
        replace: bool = True,
    ) -> AdapterInfo:
        field, source_field = fields
        keys.require_admin(record.caller)
        record.model = name
        if name == base_name:
            raise InvalidField(field, f"{base_name!r} is the base model's name")
        try:
            loaded = await adapters.load(name, source, if_absent=not replace)
        except UsageError as error:  # the source is at fault: a missing folder, a bad adapter
            error.param = error.param or source_field
            raise
        if loaded is None:  # checked as it installs: of two loads at once, one gets this
            raise InvalidField(field, f"{name!r} is loaded already: set load_inplace to replace it")
        return loaded

    async def unload(record: RequestRecord, name: str) -> None:
        keys.require_admin(record.caller)
        record.model = name
        await adapters.unload(name)  # its metric series too

    @app.post("/v1/adapters")
    async def load_adapter(record: Authenticated, body: AdapterLoad):
        return model_list.adapter_entry(
            await load(record, body.name, body.source, ("name", "source"))
        )

    # :path, as names loaded by reference hold '/' (name/3)
    @app.delete("/v1/adapters/{name:path}")
    async def unload_adapter(record: Authenticated, name: str):
        await unload(record, name)
        return {"name": name, "unloaded": True}

    # vLLM's routes for the same, with its fields and success replies: its scripts work here
    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(record: Authenticated, body: LoraAdapterLoad):
        name = body.lora_name
        await load(
            record, name, body.lora_path, ("lora_name", "lora_path"), replace=body.load_inplace
        )
        return f"Success: LoRA adapter '{name}' added successfully."

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(record: Authenticated, body: LoraAdapterUnload):
        await unload(record, body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    @app.get("/v1/models")
    async def models(record: Authenticated):
        entries = await model_list.entries(record.caller.may_use)
        return {"object": "list", "data": list(entries.values())}

    @app.get("/v1/models/{model:path}")  # :path, as references hold '/' (name/3)
    async def model(record: Authenticated, model: str):
        return await model_list.get(model, record.caller.may_use)

    async def check_model(record: RequestRecord, model: str | None) -> None:
        """A tokenization's `model`, if given: one the caller may use and a request could
        name (not loaded for it: adapters share the base's tokenizer). Not charged, as it
        generates nothing, but refused while the caller's budget is spent."""
        keys.admit(record.caller, model)
        if model is None:
            return
        if model not in (base_name, *adapters.loaded) and not await adapters.servable(model):
            raise NotFoundError(f"model {model!r} does not exist")
        record.model = model

    # vLLM's, for clients that count or cut prompts as the server will read them
    @app.post("/tokenize")
    async def tokenize(record: Authenticated, body: TokenizeRequest):
        body.check()
        await check_model(record, body.model)
        if body.messages is not None:
            messages = [m.for_template() for m in body.messages]
            record.prompt = messages
            reader.check_length("messages", sum(len(m["content"]) for m in messages))
            ids = await serving.tokenized(reader.chat, messages, body.add_generation_prompt)
        else:
            record.prompt = body.prompt
            reader.check_length("prompt", len(body.prompt))
            special = body.add_special_tokens is not False
            ids = await serving.tokenized(reader.encode, body.prompt, special)
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {
            "count": len(ids),
            "max_model_len": reader.context,
            "tokens": ids,
            "token_strs": strs,
        }

    @app.post("/detokenize")
    async def detokenize(record: Authenticated, body: DetokenizeRequest):
        await check_model(record, body.model)
        if len(body.tokens) > reader.context:
            raise InvalidField("tokens", f"more than the context length of {reader.context}")
        vocab = engine.engine.model.shape.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise InvalidField("tokens", f"holds token ids outside the vocabulary of {vocab}")
        return {"prompt": await serving.tokenized(tokenizer.decode, body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request, record: Authenticated, body: ChatCompletionRequest):
        keys.admit(record.caller, body.model)
        messages = [m.for_template() for m in body.messages]
        record.prompt = messages
        reader.check_length("messages", sum(len(m["content"]) for m in messages))
        prompt = await serving.tokenized(reader.chat, messages)
        streams = await serving.unless_gone(request, serving.start(record, body, [prompt]))
        rid = new_id("chatcmpl")
        scores = [ChatLogprobs(logprobs) for _ in streams]
        if body.stream:
            chunks = chat_chunks(streams, rid, body, scores, len(prompt))
            return sse(chunks, record, config.request_timeout_s)
        finals = await serving.last(request, streams)
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
                reader.check_length("prompt", len(prompt))
        prompts = [
            await serving.tokenized(reader.encode, p) if isinstance(p, str) else p for p in given
        ]
        streams = await serving.unless_gone(request, serving.start(record, body, prompts))
        rid = new_id("cmpl")
        # Per choice: its prompt as text (echoed, and where logprob offsets count from), and
        # whether the request gave it so (not as token ids, decoded here).
        texts = [(p, True) if isinstance(p, str) else (tokenizer.decode(p), False) for p in given]
        per_choice = [text for text in texts for _ in range(body.n)]
        scores = [CompletionLogprobs(logprobs, *text, body.echo) for text in per_choice]
        echo = [text if body.echo else "" for text, _ in per_choice]
        if body.stream:
            chunks = completion_chunks(streams, rid, body, echo, scores)
            return sse(chunks, record, config.request_timeout_s)
        finals = await serving.last(request, streams)
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

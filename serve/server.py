"""OpenAI-compatible REST server over the async engine; the `model` field picks the adapter.

`model` is the base model's name, a loaded adapter, or a registry reference (`name`,
`name@alias`, `name/3`) that is loaded on first use without a restart.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from registry.errors import NotFoundError
from registry.refs import is_ref
from serve.async_engine import AsyncLLM
from serve.outputs import RequestOutput
from serve.protocol import (
    AdapterLoad,
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    error_body,
    new_id,
    now,
)


def create_app(engine: AsyncLLM, base_name: str, default_max_tokens: int = 256) -> FastAPI:
    app = FastAPI(title="loraplex", version="0.1.0")
    tokenizer = engine.engine.tokenizer

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

    async def adapter_for(model: str) -> str | None:
        """The adapter a request's `model` names (None: the base), loaded on first use."""
        if model == base_name:
            return None
        if model in engine.engine.adapters:
            return model
        if not is_ref(model):
            raise NotFoundError(f"model {model!r} does not exist (base: {base_name!r})")
        await engine.load_adapter(model, model)
        return model

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ready"}

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoad):
        info = await engine.load_adapter(body.name, body.source)
        return {
            "name": info.name,
            "uid": info.uid,
            "source": info.source,
            "version": info.version,
            "rank": info.rank,
            "modules": info.modules,
        }

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        await engine.unload_adapter(name)
        return {"name": name, "unloaded": True}

    @app.get("/v1/models")
    async def models():
        names = [base_name, *sorted(engine.engine.adapters)]
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "loraplex",
                    "root": base_name,
                    "parent": None if name == base_name else base_name,
                }
                for name in names
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        adapter = await adapter_for(body.model)
        messages = [m.model_dump() for m in body.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        if body.max_completion_tokens:
            body.max_tokens = body.max_completion_tokens
        params = body.sampling_params(default_max_tokens, None)
        stream = await _started(engine.generate(prompt, params, adapter))
        rid = new_id("chatcmpl")
        if body.stream:
            return _sse(_chat_chunks(stream, rid, body))
        final = await _last(stream)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now(),
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": final.finish_reason,
                    "message": {"role": "assistant", "content": final.text},
                }
            ],
            "usage": _usage(final).model_dump(),
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        adapter = await adapter_for(body.model)
        params = body.sampling_params(default_max_tokens, None)
        stream = await _started(engine.generate(body.prompt, params, adapter))
        rid = new_id("cmpl")
        if body.stream:
            return _sse(_completion_chunks(stream, rid, body))
        final = await _last(stream)
        return {
            "id": rid,
            "object": "text_completion",
            "created": now(),
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "text": final.text,
                    "finish_reason": final.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(final).model_dump(),
        }

    return app


async def _started(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Wait for the first output, so a refused request fails before any response is sent."""
    first = await anext(stream)

    async def chained():
        yield first
        if not first.finished:
            async for out in stream:
                yield out

    return chained()


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for final in stream:  # noqa: B007 - only the last output matters
        pass
    return final


def _usage(output: RequestOutput) -> Usage:
    prompt, completion = len(output.prompt_token_ids), len(output.token_ids)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def _chunks(stream, base: dict, include_usage: bool, choice) -> AsyncIterator[dict]:
    """One chunk per output that adds text or finishes, then the usage when asked."""
    final = None
    async for out in stream:
        final = out
        if out.delta_text or out.finished:
            fields = {"index": 0, **choice(out), "finish_reason": out.finish_reason}
            yield {**base, "choices": [fields]}
    if include_usage and final is not None:
        yield {**base, "choices": [], "usage": _usage(final).model_dump()}


async def _chat_chunks(stream, rid: str, body: ChatCompletionRequest):
    base = {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": body.model}
    role = {"role": "assistant", "content": ""}
    yield {**base, "choices": [{"index": 0, "delta": role, "finish_reason": None}]}
    async for chunk in _chunks(
        stream, base, body.include_usage, lambda out: {"delta": {"content": out.delta_text}}
    ):
        yield chunk


def _completion_chunks(stream, rid: str, body: CompletionRequest):
    base = {"id": rid, "object": "text_completion", "created": now(), "model": body.model}
    return _chunks(
        stream, base, body.include_usage, lambda out: {"text": out.delta_text, "logprobs": None}
    )

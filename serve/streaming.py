"""The outputs of one request on their way to a client: observed for the audit record and the
metrics, cut at the request's deadline, and shaped as OpenAI's server-sent event chunks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from serve.async_engine import EngineStepError
from serve.audit import RequestRecord
from serve.openai_logprobs import ChatLogprobs, CompletionLogprobs
from serve.outputs import RequestOutput
from serve.protocol import ChatCompletionRequest, CompletionRequest, Usage, error_body, now
from serve.refusal import timed_out


async def observed(stream, record: RequestRecord, itl) -> AsyncIterator[RequestOutput]:
    """The outputs, with their tokens and timings noted on the record as they pass."""
    last_token_at = None
    async for out in stream:
        record.prompt_tokens = len(out.prompt_token_ids)
        record.completion_tokens = len(out.token_ids)
        record.finish_reason = out.finish_reason
        if out.delta_token_ids:
            at = time.monotonic()
            if record.first_token_at is None:
                record.first_token_at = at
            else:
                itl.observe(at - last_token_at)
            last_token_at = at
        yield out


async def until(stream, deadline: float, record: RequestRecord) -> AsyncIterator[RequestOutput]:
    """The outputs until the deadline (loop time); then TimeoutError, the request aborted."""
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                out = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            record.finish_reason = "timeout"
            raise
        yield out


async def started(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Wait for the first output, so a refused request fails before any response is sent."""
    first = await anext(stream)

    async def chained():
        yield first
        if not first.finished:
            async for out in stream:
                yield out

    return chained()


async def last_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for final in stream:  # noqa: B007 - only the last output matters
        pass
    return final


def usage(output: RequestOutput) -> Usage:
    prompt, completion = len(output.prompt_token_ids), len(output.token_ids)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def sse(events: AsyncIterator[dict], timeout_s: float) -> StreamingResponse:
    """Server-sent events; a stream cut by its deadline or a failed step ends with an error
    event (OpenAI's shape, which its client raises) before `[DONE]`."""

    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except TimeoutError:
            error = timed_out(timeout_s)
            yield f"data: {json.dumps(error_body(str(error), error.kind, None, error.code))}\n\n"
        except EngineStepError as error:
            yield f"data: {json.dumps(error_body(str(error), 'server_error'))}\n\n"
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
        yield {**base, "choices": [], "usage": usage(final).model_dump()}


async def chat_chunks(stream, rid: str, body: ChatCompletionRequest, logprobs: ChatLogprobs):
    base = {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": body.model}
    role = {"role": "assistant", "content": ""}
    yield {**base, "choices": [{"index": 0, "delta": role, "finish_reason": None}]}

    def choice(out: RequestOutput) -> dict:
        return {"delta": {"content": out.delta_text}, "logprobs": logprobs.take(out)}

    async for chunk in _chunks(stream, base, body.include_usage, choice):
        yield chunk


def completion_chunks(
    stream, rid: str, body: CompletionRequest, echo: str, logprobs: CompletionLogprobs
):
    """Chunks of a completion; `echo` (the prompt, or nothing) leads the first one."""
    base = {"id": rid, "object": "text_completion", "created": now(), "model": body.model}
    lead = [echo]

    def choice(out: RequestOutput) -> dict:
        text = lead.pop() + out.delta_text if lead else out.delta_text
        return {"text": text, "logprobs": logprobs.take(out)}

    return _chunks(stream, base, body.include_usage, choice)

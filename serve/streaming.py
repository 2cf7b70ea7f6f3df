"""The outputs of one request on their way to a client: observed for the audit record and the
metrics, cut at the request's deadline, and shaped as OpenAI's server-sent event chunks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from serve.async_engine import EngineStepError
from serve.audit import RequestRecord
from serve.error_handlers import engine_failed
from serve.openai_logprobs import ChatLogprobs, CompletionLogprobs
from serve.outputs import RequestOutput
from serve.protocol import ChatCompletionRequest, CompletionRequest, Usage, error_body, now
from serve.refusal import timed_out

log = logging.getLogger(__name__)


async def observed(
    stream, record: RequestRecord, itl, counts_prompt: bool = True
) -> AsyncIterator[RequestOutput]:
    """The outputs, with their tokens and timings added to the record as they pass (a prompt
    with several choices counts once: `counts_prompt` for one of them)."""
    last_token_at = None
    prompt = completion = 0  # tokens already on the record
    async for out in stream:
        if counts_prompt:
            record.prompt_tokens += len(out.prompt_token_ids) - prompt
            prompt = len(out.prompt_token_ids)
        record.completion_tokens += len(out.token_ids) - completion
        completion = len(out.token_ids)
        if out.finished:
            record.finish_reason = out.finish_reason
        if out.delta_token_ids:
            at = time.monotonic()
            if record.first_token_at is None:
                record.first_token_at = at
            elif last_token_at is not None:
                itl.observe(at - last_token_at)
            last_token_at = at
        yield out


async def prompt_only(stream) -> AsyncIterator[RequestOutput]:
    """`max_tokens: 0` (with echo: the prompt scored): the one token computed is not returned,
    nor how it would have ended the answer (an EOS or a completed grammar: "stop"); no token
    is the length asked for."""
    async for out in stream:
        yield dataclasses.replace(
            out,
            finish_reason="length" if out.finished else None,
            text="",
            token_ids=[],
            delta_text="",
            delta_token_ids=[],
            logprobs=None if out.logprobs is None else [],
        )


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
        except EngineStepError:
            record.finish_reason = "error"
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


async def all_started(streams: list[AsyncIterator[RequestOutput]]) -> list[AsyncIterator]:
    """`started` for all streams at once (their requests queue together); if one is refused,
    the others are stopped, which aborts their requests, and the refusal raised."""
    firsts = [asyncio.ensure_future(started(s)) for s in streams]
    try:
        return [await first for first in firsts]
    except BaseException:
        for first in firsts:
            first.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        raise


async def last_outputs(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Each stream's final output. If one fails or this is cancelled, the others are
    cancelled too, which aborts their requests."""

    async def last(stream):
        final = None
        async for final in stream:  # noqa: B007 - only the last output matters
            pass
        return final

    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    try:
        return [await task for task in tasks]
    finally:
        for task in tasks:
            task.cancel()


async def interleaved(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(index, item) from all streams as each arrives. An error in one ends them all: the
    others' pending reads are cancelled, which aborts their requests."""
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, item
    finally:
        for task in pending:
            task.cancel()


def usage(outputs: list[RequestOutput], n: int) -> Usage:
    """Of all choices, `n` per prompt in order: each prompt counted once."""
    prompt = sum(len(out.prompt_token_ids) for out in outputs[::n])
    completion = sum(len(out.token_ids) for out in outputs)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


# A stream's error event after its deadline gets this long to reach a client that reads.
SEND_GRACE_S = 5.0


def sse(events: AsyncIterator[dict], record: RequestRecord, timeout_s: float) -> StreamingResponse:
    """Server-sent events; a stream cut by its deadline, a failed step or a bug ends with an
    error event (OpenAI's shape, which its client raises) before `[DONE]`. A client that stops
    reading is cut SEND_GRACE_S past the deadline (`_EventStream`)."""

    async def body():
        async with contextlib.aclosing(events):  # closed early: its requests are aborted
            try:
                async for event in events:
                    yield f"data: {json.dumps(event)}\n\n"
            except (TimeoutError, EngineStepError) as error:
                refusal = (
                    timed_out(timeout_s)
                    if isinstance(error, TimeoutError)
                    else engine_failed(error)
                )
                body = error_body(str(refusal), refusal.kind, None, refusal.code)
                yield f"data: {json.dumps(body)}\n\n"
            except Exception:  # a bug of ours: the client's stream ends with an error all the same
                log.exception("stream of %s failed", record.request_id)
                record.finish_reason = "error"
                yield f"data: {json.dumps(error_body('internal server error', 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s - (time.monotonic() - record.started)
    return _EventStream(body(), record, deadline + SEND_GRACE_S)


class _EventStream(StreamingResponse):
    """Each send waits at most until `send_by` (loop time). The deadline of a request is
    checked as its outputs are read, and they are read only as the client takes them: a
    client that stops reading would otherwise hold its requests running and its outputs
    queued for as long as it likes, and hold up the server's shutdown."""

    def __init__(self, body: AsyncIterator[str], record: RequestRecord, send_by: float):
        super().__init__(body, media_type="text/event-stream")
        self.record = record
        self.send_by = send_by

    async def stream_response(self, send) -> None:
        async def send_in_time(message) -> None:
            async with asyncio.timeout_at(self.send_by):
                await send(message)

        try:
            await super().stream_response(send_in_time)
        except TimeoutError:
            # The connection is left unfinished, which uvicorn closes (logging that the
            # response was not completed); closing the body aborts the requests.
            await self.body_iterator.aclose()
            self.record.finish_reason = "timeout"
            log.warning("%s: the client stopped reading; stream cut", self.record.request_id)


async def _chunks(streams, base: dict, body, choice) -> AsyncIterator[dict]:
    """One chunk per output that adds text or finishes, with its choice's index, then the
    usage when asked. `choice(k, out)`: the choice's own fields."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for k, out in interleaved(streams):
        finals[k] = out
        if out.delta_text or out.finished:
            fields = {"index": k, **choice(k, out), "finish_reason": out.finish_reason}
            so_far = {"usage": usage([out], 1).model_dump()} if body.continuous_usage else {}
            yield {**base, "choices": [fields]} | so_far
    if body.include_usage and all(finals):
        yield {**base, "choices": [], "usage": usage(finals, body.n).model_dump()}


def _base(rid: str, kind: str, body) -> dict:
    """Every chunk's fields; with usage asked, `usage: null` on each chunk but the last (as
    OpenAI sends it), unless it is asked continuously."""
    base = {"id": rid, "object": kind, "created": now(), "model": body.model}
    return base | ({"usage": None} if body.include_usage else {})


async def chat_chunks(
    streams, rid: str, body: ChatCompletionRequest, logprobs: list[ChatLogprobs], prompt_tokens: int
):
    base = _base(rid, "chat.completion.chunk", body)
    role = {"role": "assistant", "content": ""}
    so_far = {}
    if body.continuous_usage:  # no completion token yet
        so_far["usage"] = Usage(
            prompt_tokens=prompt_tokens, completion_tokens=0, total_tokens=prompt_tokens
        ).model_dump()
    for k in range(len(streams)):
        yield {**base, "choices": [{"index": k, "delta": role, "finish_reason": None}]} | so_far

    def choice(k: int, out: RequestOutput) -> dict:
        return {"delta": {"content": out.delta_text}, "logprobs": logprobs[k].take(out)}

    async for chunk in _chunks(streams, base, body, choice):
        yield chunk


def completion_chunks(
    streams, rid: str, body: CompletionRequest, echo: list[str], logprobs: list[CompletionLogprobs]
):
    """Chunks of a completion; each choice's `echo` (its prompt, or nothing) leads its first."""
    base = _base(rid, "text_completion", body)
    echoed: set[int] = set()

    def choice(k: int, out: RequestOutput) -> dict:
        lead = "" if k in echoed else echo[k]
        echoed.add(k)
        return {"text": lead + out.delta_text, "logprobs": logprobs[k].take(out)}

    return _chunks(streams, base, body, choice)

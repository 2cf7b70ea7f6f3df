"""What the chat and completion routes share: the model a request names (loaded on first
use), its prompts tokenized off the event loop, its choices queued on the engine within its
deadline and token budget, and a client that hangs up before the answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator, Awaitable

from fastapi import Request

from registry.errors import NotFoundError, UnknownAdapterError, UsageError
from serve.adapter_watch import AdapterWatch
from serve.api_keys import ApiKeys
from serve.async_engine import AsyncLLM
from serve.audit import SCOPE_KEY, RequestRecord
from serve.metrics import ServerMetrics
from serve.outputs import RequestOutput
from serve.prompt_reader import PromptReader
from serve.protocol import ChatCompletionRequest, InvalidField
from serve.refusal import client_gone, timed_out
from serve.streaming import all_started, last_outputs, observed, prompt_only, until

log = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.5  # how often a request not streaming yet checks that its client is there


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncLLM,
        base_name: str,
        adapters: AdapterWatch,
        reader: PromptReader,
        keys: ApiKeys,
        metrics: ServerMetrics,
        request_timeout_s: float,
    ):
        self.engine = engine
        self.base_name = base_name
        self.adapters = adapters
        self.reader = reader
        self.keys = keys
        self.metrics = metrics
        self.timeout_s = request_timeout_s
        # Prompts are tokenized on threads of their own: registry calls, which can hang for as
        # long as the registry is unreachable, hold the loop's default threads.
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(
            thread_name_prefix="asyncio-tokenize"
        )

    def close(self) -> None:
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    async def tokenized(self, function, *args) -> list[int]:
        """Off the event loop (other streams go on) and off the engine thread (steps go on)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizing, function, *args)

    async def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base), loaded on first use."""
        if model == self.base_name:
            return None
        if model in self.adapters.loaded:
            self.adapters.asked(model)
            return model
        missing = (
            f"model {model!r} does not exist: not the base ({self.base_name!r}), a loaded adapter"
        )
        if self.adapters.adapter_dir is not None:
            missing += ", an adapter folder in adapter_dir"
        # off the loop: adapter_dir may be a network mount
        source = await asyncio.to_thread(self.adapters.first_use_source, model)
        if source is None:
            raise NotFoundError(f"{missing} or a registry reference")
        try:
            await self.adapters.ensure(model, source)
        except UnknownAdapterError as error:  # its URI and the names registered stay in the log
            log.info("model %r: %s", model, error)
            raise NotFoundError(f"{missing} or a registered adapter") from None
        except UsageError as error:  # not an adapter, or not for this base: `model` names it
            error.param = error.param or "model"
            if self.adapters.adapter_dir is not None:  # where the server keeps them is its own
                error.args = (str(error).replace(str(self.adapters.adapter_dir), "adapter_dir"),)
            raise
        return model

    async def start(self, record: RequestRecord, body, prompts: list) -> list[AsyncIterator]:
        """Queue each choice (`n` per prompt, in order) on the request's adapter; their outputs,
        once each has its first (so a refusal is an error status, not a broken stream), cut
        at the request's deadline. One refused choice aborts the others.

        A prompt's other choices are queued once its first has its first token: its prompt's
        full blocks are then in the prefix cache, so they compute only the rest (n prefills
        become one, and the first choice streams meanwhile)."""
        loop = asyncio.get_running_loop()
        elapsed = time.monotonic() - record.started
        deadline = loop.time() + self.timeout_s - elapsed
        n = body.n
        max_waiting = self.engine.max_waiting
        if max_waiting is not None and len(prompts) * n > max_waiting:
            raise InvalidField(
                "prompt" if len(prompts) > 1 else "n",
                f"{len(prompts)} prompt(s) x n={n} are more requests than can ever queue at "
                f"once (max_waiting: {max_waiting})",
            )
        field = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        params = [
            body.choice_params(self.reader.max_tokens_for(body, len(p), field)) for p in prompts
        ]
        most = sum(len(p) + n * ps[0].max_tokens for p, ps in zip(prompts, params, strict=True))
        record.reserved_tokens = self.keys.reserve(record.caller, most)
        try:
            async with asyncio.timeout_at(deadline):
                adapter = await self.adapter_for(body.model)
                record.model = body.model
                info = self.adapters.loaded.get(adapter) if adapter else None  # None: unloaded
                # Every choice on this version, even if the name is replaced meanwhile (the
                # engine refuses an unloaded name when the uid is None).
                uid = record.adapter_uid = info.uid if info else None
                itl = self.metrics.itl.labels(body.model)

                def queue(i: int, j: int) -> AsyncIterator[RequestOutput]:
                    k = i * n + j  # the choice's index in the response
                    rid = record.request_id + (f"-{k}" if k else "")
                    outputs = self.engine.generate(prompts[i], params[i][j], adapter, rid, uid)
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
            raise timed_out(self.timeout_s) from None

    async def unless_gone(self, request: Request, work: Awaitable):
        """`work`'s result; a client that hangs up first cancels it, which aborts its
        requests (their streams' end frees their KV blocks), and gets 499, as a streaming
        client does by closing the stream."""
        task = asyncio.ensure_future(work)
        try:
            while not (await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected() and not task.done():
                    raise client_gone(request.scope[SCOPE_KEY])
            return task.result()
        finally:
            task.cancel()

    async def last(self, request: Request, streams: list[AsyncIterator]) -> list[RequestOutput]:
        """The final output of each choice (aborted if the client hangs up first)."""
        try:
            return await self.unless_gone(request, last_outputs(streams))
        except TimeoutError:
            raise timed_out(self.timeout_s) from None

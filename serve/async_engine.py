"""The engine for asyncio servers: it steps on its own thread; requests stream their outputs.

    engine = AsyncLLM(LLMEngine(config))
    async for output in engine.generate(prompt, params, adapter="faq"):
        ...  # one RequestOutput per new token; leaving the loop early aborts the request

Bad input raises from `generate` before anything is queued; a failing step fails only the
requests that were in it, and the engine goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from serve.engine import AdapterInfo, LLMEngine
from serve.outputs import RequestOutput
from serve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine step that was computing this request failed."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()  # the engine is not thread-safe: one caller at a time
        self._work = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            request_id = self.engine.add_request(prompt, params, adapter, request_id)
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._work.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the caller went away (disconnect, timeout): free its blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            self._streams.pop(request_id, None)
            return self.engine.abort(request_id)

    async def load_adapter(self, name: str, source: str) -> AdapterInfo:
        """Read the adapter off the engine thread, then install it between two steps."""
        loaded = await asyncio.to_thread(self.engine.read_adapter, name, source)
        with self._lock:
            return self.engine.install_adapter(loaded)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            self.engine.unload_adapter(name)

    def stats(self) -> dict[str, float]:
        with self._lock:
            return self.engine.stats

    def shutdown(self) -> None:
        self._stopped = True
        self._work.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopped:
            if not self.engine.has_unfinished:
                self._work.wait(timeout=0.5)
                self._work.clear()
                continue
            with self._lock:
                try:
                    outputs = self.engine.step()
                except Exception as error:  # a bug or out-of-memory: fail those, keep serving
                    log.exception("engine step failed")
                    self._fail_running(error)
                    continue
                deliveries = [(self._streams.get(o.request_id), o) for o in outputs]
                for output in outputs:
                    if output.finished:
                        self._streams.pop(output.request_id, None)
            for stream, output in deliveries:
                if stream is not None:
                    loop, queue = stream
                    loop.call_soon_threadsafe(queue.put_nowait, output)

    def _fail_running(self, error: Exception) -> None:
        for seq in list(self.engine.scheduler.running):
            stream = self._streams.pop(seq.request_id, None)
            self.engine.abort(seq.request_id)
            if stream is not None:
                loop, queue = stream
                loop.call_soon_threadsafe(queue.put_nowait, EngineStepError(str(error)))

"""The engine for asyncio servers: it steps on its own thread; requests stream their outputs.

    engine = AsyncLLM(LLMEngine(config))
    async for output in engine.generate(prompt, params, adapter="faq"):
        ...  # one RequestOutput per new token; leaving the loop early aborts the request

Only the engine thread touches the engine: callers hand it commands (add, abort, install an
adapter) that run between two steps, so the event loop never waits for a step to end. Bad
input raises from `generate` before anything is queued; a failing step fails only the requests
that were in it (`EngineStepError`), a request the engine ends alone only itself
(`RequestFailed`), and the engine goes on serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from serve.adapter_catalog import AdapterInfo
from serve.engine import LLMEngine
from serve.outputs import RequestOutput
from serve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine step that was computing this request failed."""


class RequestFailed(EngineStepError):
    """The engine ended this request alone (its adapter could not be read back, or its own
    output failed); the others in its step went on. `__cause__` is the engine's error."""

    @classmethod
    def caused_by(cls, error: Exception) -> RequestFailed:
        failed = cls(str(error))
        failed.__cause__ = error
        return failed


class QueueFull(RuntimeError):
    """`max_waiting` requests are already queued: the server is overloaded."""


class EngineStopped(EngineStepError):
    """The engine was shut down before this request or command was served."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting  # queued requests beyond which `generate` refuses
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # (command, future)
        self._work = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False  # asked to stop
        self._closed = False  # stopped: the inbox takes no more commands
        self._closing = threading.Lock()  # so that no command is queued after the last drain
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        adapter_uid: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """`adapter_uid` pins the adapter's version (`LLMEngine.add_request`). Bad input
        raises `UsageError`."""
        stream = (asyncio.get_running_loop(), asyncio.Queue())

        def add() -> str:
            waiting = len(self.engine.scheduler.waiting)
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise QueueFull(f"{waiting} requests are already waiting; try again later")
            rid = self.engine.add_request(prompt, params, adapter, request_id, adapter_uid)
            self._streams[rid] = stream
            return rid

        added = self._submit(add)
        try:
            request_id = await asyncio.wrap_future(added)
        except asyncio.CancelledError:  # gave up while queued: abort it if it was added
            added.add_done_callback(lambda added: self._abort_if_added(added, stream))
            raise
        finished = False
        try:
            while not finished:
                item = await stream[1].get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the caller went away (disconnect, timeout): free its blocks
                self._submit(lambda: self._abort(request_id, stream))

    async def abort(self, request_id: str) -> bool:
        return await asyncio.wrap_future(self._submit(lambda: self._abort(request_id)))

    async def load_adapter(
        self,
        name: str,
        source: str,
        replacing: AdapterInfo | None = None,
        executor: concurrent.futures.Executor | None = None,
        if_absent: bool = False,
    ) -> AdapterInfo | None:
        """Read the adapter off the engine thread (in `executor`, else asyncio's default),
        then install it between two steps.

        With `replacing`, only if that very AdapterInfo is still the one loaded under `name`
        when the install runs (a compare-and-swap on the engine thread); else nothing is
        installed and the answer is None: the adapter was unloaded or replaced meanwhile.
        With `if_absent`, only if nothing is loaded under `name` then (else None)."""
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(executor, self.engine.read_adapter, name, source)

        def install() -> AdapterInfo | None:
            held = self.engine.adapters.get(name)
            if (replacing is not None and held is not replacing) or (
                if_absent and held is not None
            ):
                return None
            return self.engine.install_adapter(loaded)

        return await asyncio.wrap_future(self._submit(install))

    async def unload_adapter(self, name: str) -> None:
        await asyncio.wrap_future(self._submit(lambda: self.engine.unload_adapter(name)))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def stats(self, timeout: float = 30) -> dict[str, float]:
        """Engine counters, read between two steps (blocks the calling thread, not the engine)."""
        return self._submit(lambda: self.engine.stats).result(timeout)

    async def stats_async(self) -> dict[str, float]:
        """Engine counters, read between two steps without blocking the event loop."""
        return await asyncio.wrap_future(self._submit(lambda: self.engine.stats))

    def shutdown(self) -> None:
        """Stop the engine thread; open streams, queued and later calls raise EngineStopped."""
        self._stopped = True
        self._work.set()
        self._thread.join(timeout=10)

    def _submit(self, command: Callable) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._closing:
            if self._closed:
                future.set_exception(EngineStopped("the engine was shut down"))
                return future
            self._inbox.put((command, future))
        self._work.set()
        return future

    def _abort_if_added(self, added: concurrent.futures.Future, stream) -> None:
        if not added.cancelled() and added.exception() is None:
            self._submit(lambda: self._abort(added.result(), stream))

    def _abort(self, request_id: str, stream=None) -> bool:
        """Abort a request; with `stream` (its consumer left), only while that stream is still
        its own: a stream left after its request finished must not abort a later request
        reusing the id. Aborted by another caller, its consumer gets the last output."""
        if stream is not None:  # its consumer left: nothing more goes to it
            if self._streams.get(request_id) is not stream:
                return False
            del self._streams[request_id]
            try:
                return self.engine.abort(request_id) is not None
            except Exception:  # a bug; no one reads this command's result: logged here
                log.exception("request %s: its abort failed", request_id)
                raise
        try:
            final = self.engine.abort(request_id)
        except Exception as error:  # its last output failed (a bug): released, and told so
            self._fail_stream(request_id, RequestFailed.caused_by(error))
            raise
        if final is not None and (own := self._streams.pop(request_id, None)) is not None:
            self._put(own, final)
        return final is not None

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._close()

    def _close(self) -> None:
        """Fail what can no longer be served: queued commands and open streams."""
        stopped = EngineStopped("the engine was shut down")
        with self._closing:
            self._closed = True
        while not self._inbox.empty():
            _, future = self._inbox.get()
            if future.set_running_or_notify_cancel():
                future.set_exception(stopped)
        for request_id in list(self._streams):
            self._fail_stream(request_id, stopped)

    def _serve(self) -> None:
        while not self._stopped:
            while not self._inbox.empty():
                command, future = self._inbox.get()
                if not future.set_running_or_notify_cancel():
                    continue  # its caller gave up (timeout, disconnect) before it ran
                try:
                    future.set_result(command())
                except Exception as error:  # the caller's mistake: it gets the error
                    future.set_exception(error)
            if not self.engine.has_unfinished:
                self._work.wait(timeout=0.5)
                self._work.clear()
                continue
            try:
                # outputs stream as soon as made: while the device computes, when overlapping
                self.engine.step(deliver=self._deliver)
            except Exception as error:  # a bug or out-of-memory: fail those, keep serving
                log.exception("engine step failed")
                self._fail_cut(error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = (
                self._streams.pop(output.request_id, None)
                if output.finished
                else self._streams.get(output.request_id)
            )
            if stream is None:
                continue
            failed = output.error is not None
            self._put(stream, RequestFailed.caused_by(output.error) if failed else output)

    def _fail_cut(self, error: Exception) -> None:
        for request_id in self.engine.abort_cut():
            self._fail_stream(request_id, EngineStepError(str(error)))

    def _fail_stream(self, request_id: str, error: Exception) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._put(stream, error)

    def _put(self, stream, item: RequestOutput | Exception) -> None:
        """Hand an output or error to its consumer's event loop. A loop closed meanwhile takes
        nothing, and must not fail the step (every other request in it) for one caller:
        its request is aborted before the next step, if the stream is still its own."""
        loop, q = stream
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # "Event loop is closed"
            if isinstance(item, RequestOutput) and not item.finished:
                self._submit(lambda: self._abort(item.request_id, stream))

"""The server's adapters: loaded on first use, followed when their registry reference moves.

A request for `name@alias` (or a bare `name`, the latest version), or for the name of a folder
in `adapter_dir`, loads it once, however many requests ask at the same time. Every `interval`
seconds the registry references of loaded adapters are resolved again; one that now points at
other weights (its alias or the latest version moved, or its version's number was reused) is
read and installed under the same name. New requests get the new version; requests in flight
keep the adapter uid (name/version and its bytes) they started with, and so their slot and
prefix-cache entries. A folder is read once: one rewritten is read again only once unloaded.

An unreachable registry fails fast: MLflow's client would retry it for minutes (7 retries with
exponential back-off, 120 s a call), so unless the environment says otherwise the server's
calls retry twice and wait 10 s; the model list then leaves registered adapters out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from registry.download_cache import mark_used
from registry.errors import AdapterError, NotFoundError, UnknownAdapterError
from registry.home import prefer_env
from registry.refs import is_name, is_ref, parse_ref
from registry.resolve import names_registry
from registry.store import AdapterRegistry, RegisteredAdapter
from registry.tracking import hide_password, is_missing, redacted
from serve.adapter_catalog import AdapterInfo
from serve.async_engine import AsyncLLM
from serve.refusal import registry_unavailable

log = logging.getLogger(__name__)

# What a server's registry calls allow themselves (a variable the user set wins).
REGISTRY_HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_LIST_TIMEOUT_S = 15  # the model list waits no longer for the registry, whatever MLflow does
REGISTRY_THREADS = 4  # registry calls at once; more wait their turn


class AdapterWatch:
    def __init__(
        self,
        engine: AsyncLLM,
        on_load: Callable[[str], None] = lambda reason: None,
        on_unload: Callable[[str], None] = lambda name: None,
        adapter_dir: Path | None = None,
    ):
        self.engine = engine
        # Adapter folders loaded when a request names one; absolute, so that no folder's path
        # reads as a registry reference (`adapters/3`, `sql` under `.`)
        self.adapter_dir = adapter_dir.resolve() if adapter_dir is not None else None
        self.on_load = on_load  # called with the reason: first_use, api or alias_moved
        self.on_unload = on_unload  # called with the name of each adapter unloaded
        # An adapter loaded on first use -> when a request last named it (monotonic)
        self._asked: dict[str, float] = {}
        for variable, value in REGISTRY_HTTP_LIMITS.items():  # MLflow reads them at each call
            prefer_env(variable, value)
        self.registry = AdapterRegistry(engine.engine.config.tracking_uri, engine.engine.home)
        self._loading: dict[str, asyncio.Future] = {}
        # loaded uid -> (version, artifact) a move pointed it at that cannot be served
        # (another base, a rank over the limit): not read again each poll until it moves on.
        self._refused: dict[str, tuple[int, str]] = {}
        # The registry's calls on threads of their own: a hung registry holds these (each
        # call up to its timeout), not asyncio's default pool that folder loads use.
        self._registry_calls = ThreadPoolExecutor(REGISTRY_THREADS, "registry")

    async def _in_registry_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(
            self._registry_calls, function, *args
        )

    @property
    def loaded(self) -> dict[str, AdapterInfo]:
        return self.engine.engine.adapters

    async def load(
        self,
        name: str,
        source: str,
        reason: str = "api",
        replacing: AdapterInfo | None = None,
        if_absent: bool = False,
    ) -> AdapterInfo | None:
        """Read and install; with `replacing`, only over that adapter (None if it is gone),
        with `if_absent` only under a name still free (None if not). A registry that cannot
        be read is a 503; its error, with its URI, goes to the log."""
        from mlflow.exceptions import MlflowException

        try:
            executor = self._registry_calls if names_registry(source) else None
            info = await self.engine.load_adapter(name, source, replacing, executor, if_absent)
        except MlflowException as error:  # our own errors (not found, not an adapter) pass
            log.warning("cannot load %s from the registry: %s", source, self._told(error))
            if is_missing(error):  # for good: no retry helps
                raise NotFoundError(
                    f"registered adapter {source!r} has no files in the registry's "
                    "artifact store (deleted there?)"
                ) from None
            raise registry_unavailable() from None
        except UnknownAdapterError as error:  # its URI and the names registered stay here
            log.info("cannot load %s: %s", source, error)
            raise UnknownAdapterError(
                f"no registered adapter named {parse_ref(source).name!r}"
            ) from None
        if info is not None:
            self.on_load(reason)
            if reason == "api":  # loaded on purpose now: never unloaded for being idle
                self._asked.pop(name, None)
        return info

    def first_use_source(self, model: str) -> str | None:
        """Where a request's `model`, not loaded, loads from on first use: its folder in
        `adapter_dir`, else the registry (`model` a reference); None: nowhere."""
        folder = self._folder(model)
        if folder is not None:
            return str(folder)
        return model if is_ref(model) else None

    async def servable(self, model: str) -> bool:
        """Whether a request naming `model`, not loaded, would load an adapter: a folder in
        `adapter_dir`, or a registered version (one registry lookup; 503 if unreachable)."""
        source = await asyncio.to_thread(self.first_use_source, model)
        if source is None or not names_registry(source):
            return source is not None
        from mlflow.exceptions import MlflowException

        try:
            await self._in_registry_thread(self.registry.get, parse_ref(model))
        except NotFoundError:
            return False
        except MlflowException as error:
            log.warning("cannot look up %s in the registry: %s", model, self._told(error))
            raise registry_unavailable() from None
        return True

    def folder_names(self) -> list[str]:
        """The adapters in `adapter_dir` a request may name (reads the folder: off the loop)."""
        if self.adapter_dir is None:
            return []
        try:
            names = [path.name for path in self.adapter_dir.iterdir()]
        except OSError as error:  # removed or unreadable since the server started
            log.warning("cannot list adapter_dir %s: %s", self.adapter_dir, error)
            return []
        return sorted(name for name in names if self._folder(name) is not None)

    def _folder(self, name: str) -> Path | None:
        # An adapter name is one path component, not hidden: never `..` nor `a/b`
        if self.adapter_dir is None or not is_name(name):
            return None
        folder = self.adapter_dir / name
        return folder if (folder / "adapter_config.json").is_file() else None

    async def ensure(self, name: str, source: str | None = None) -> AdapterInfo:
        """The adapter loaded under `name` from `source` (a registry reference or a folder;
        default `name`, a reference), loaded once."""
        if name in self.loaded:
            return self.loaded[name]
        pending = self._loading.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._first_use(name, source or name))
            self._loading[name] = pending
            pending.add_done_callback(lambda done: self._loaded(name, done))
        # Shielded: a caller that times out must not cancel the load others wait for.
        return await asyncio.shield(pending)

    async def _first_use(self, name: str, source: str) -> AdapterInfo:
        # An admin's load under this name while the source was read wins over it.
        info = await self.load(name, source, "first_use", if_absent=True)
        if info is not None:
            self._asked[name] = time.monotonic()
        else:
            info = self.loaded.get(name)
        if info is None:  # loaded by the API, then unloaded, all while this read it
            raise NotFoundError(f"adapter {name!r} was unloaded while it loaded; ask again")
        return info

    def _loaded(self, ref: str, done: asyncio.Future) -> None:
        self._loading.pop(ref, None)
        if not done.cancelled():
            done.exception()  # its waiters have it; marked retrieved even if all gave up

    async def follow_moves(self) -> list[str]:
        """Reload the adapters whose alias (or latest version) moved, or whose version's
        number now means other weights (its model deleted and registered again); their
        names."""
        moved = []
        loaded = list(self.loaded.values())
        uids = {info.uid for info in loaded}
        self._refused = {uid: t for uid, t in self._refused.items() if uid in uids}
        for info in loaded:
            if info.version is None:
                continue  # a folder
            ref = parse_ref(info.source)  # a fixed version too: its number may be reused
            try:
                current = await self._in_registry_thread(self.registry.get, ref)
            except Exception as error:  # registry down or the alias deleted: keep serving
                log.warning("cannot resolve %s to follow it: %s", info.source, self._told(error))
                continue
            target = (current.version, current.source)
            same = target == (info.version, info.artifact)
            if same or self.loaded.get(info.name) is not info:
                continue
            if self._refused.get(info.uid) == target:
                continue  # warned about already
            try:
                # Over `info` only: an unload or a replacement meanwhile (the API) wins.
                new = await self.load(info.name, info.source, "alias_moved", replacing=info)
            except Exception as error:
                told = self._told(error)
                log.warning("cannot load %s version %d: %s", ref, current.version, told)
                if isinstance(error, AdapterError):  # the adapter's own fault: no retry helps
                    self._refused[info.uid] = target
                continue
            if new is None:
                log.info("%s was unloaded or replaced while it was read again", info.name)
                continue
            log.info("%s now serves %s (was %s)", info.name, new.uid, info.uid)
            moved.append(info.name)
        return moved

    def asked(self, name: str) -> None:
        """A request names `name`: an adapter loaded on first use stays while asked for."""
        if name in self._asked:
            self._asked[name] = time.monotonic()

    async def unload(self, name: str) -> None:
        """Unload `name` (NotFoundError if it is not loaded): requests in flight finish on
        the version they started with."""
        self._asked.pop(name, None)
        await self.engine.unload_adapter(name)
        self.on_unload(name)

    async def unload_idle(self, idle_s: float) -> list[str]:
        """Unload the adapters loaded on first use that no request named for `idle_s`:
        each distinct one a client asks for would otherwise stay loaded, listed and followed
        for good. Requests in flight finish on the version they started with."""
        now = time.monotonic()
        idle = [name for name, at in self._asked.items() if now - at > idle_s]
        for name in idle:
            try:
                await self.unload(name)
            except NotFoundError:  # unloaded by the API meanwhile
                continue
            log.info("%s unloaded: no request for %.0f s", name, idle_s)
        return idle

    async def follow(self, interval: float, idle_s: float | None = None) -> None:
        """`follow_moves` (and `unload_idle`) every `interval` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.hold_downloads()
                await self.follow_moves()
                if idle_s is not None:
                    await self.unload_idle(idle_s)
            except Exception:  # a bug of ours: logged, and the next poll tries again
                log.exception("following the registry's aliases failed")

    def hold_downloads(self) -> None:
        """Mark the downloads of the registry versions loaded used, so that `loraplex
        registry prune-cache` spares them: the host tier may evict one and read it back."""
        # A copy: the engine thread may load or unload while mark_used waits on the disk.
        for info in list(self.loaded.values()):
            if info.version is not None:
                mark_used(info.path)

    async def registered(self) -> list[RegisteredAdapter] | None:
        """The registry's adapters; None (with a warning) when it cannot be read."""
        try:
            listing = self._in_registry_thread(self.registry.list)
            return await asyncio.wait_for(listing, _LIST_TIMEOUT_S)
        except Exception as error:
            uri = redacted(self.registry.tracking_uri)
            log.warning("cannot list the registry %s: %s", uri, self._told(error))
            return None

    def _told(self, error: Exception) -> str:
        """An error as the log may hold it: MLflow's quote the registry's URL, password too."""
        return hide_password(str(error), self.registry.tracking_uri)

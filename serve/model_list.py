"""What `GET /v1/models` lists: the base, the loaded adapters with their version, and the
adapters a request may load on first use: registered ones (and their aliases) and the folders
in `adapter_dir`."""

from __future__ import annotations

import asyncio

from registry.errors import NotFoundError, UsageError
from registry.refs import AdapterRef, is_ref, parse_ref
from serve.adapter_watch import AdapterWatch
from serve.refusal import registry_unavailable


class ModelList:
    def __init__(self, adapters: AdapterWatch, base_name: str):
        self.adapters = adapters
        self.base_name = base_name
        self._listing: asyncio.Future | None = None  # the registry's, asked once for all

    async def entries(self, may_use) -> dict[str, dict]:
        """The entries, by id, whose id `may_use` allows."""
        return self._entries(await self._registered(), await self._folders(), may_use)

    async def get(self, model: str, may_use) -> dict:
        """`model`'s entry. While the registry cannot be read, a reference to it that is not
        loaded may yet be registered: a 503, not a 404."""
        registered = await self._registered()
        entry = self._entries(registered, await self._folders(), may_use).get(model)
        if entry is not None:
            return entry
        if registered is None and is_ref(model):
            raise registry_unavailable()
        raise NotFoundError(f"model {model!r} does not exist")

    def _entries(self, registered, folders: list[str], may_use) -> dict[str, dict]:
        entries = {self.base_name: self.entry(self.base_name)}
        for name, info in sorted(self.adapters.loaded.items()):
            entries[name] = self.adapter_entry(info)
        for name in folders:  # before the registry's: a request for the name loads the folder
            entries.setdefault(name, {**self.entry(name), "loaded": False})
        for adapter in registered or []:
            if adapter.latest_version is None:
                continue  # no version to load yet
            aliases = (AdapterRef(adapter.name, alias=a) for a in adapter.aliases)
            for ref in (AdapterRef(adapter.name), *aliases):
                if _reads_back(ref):
                    entries.setdefault(str(ref), {**self.entry(str(ref)), "loaded": False})
        return {k: entry for k, entry in entries.items() if may_use(k)}

    def entry(self, name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "loraplex",
            "root": self.base_name,
            "parent": None if name == self.base_name else self.base_name,
        }

    def adapter_entry(self, info) -> dict:
        """A loaded adapter's entry: its version, and what `loraplex gate --server` checks."""
        return {
            **self.entry(info.name),
            "loaded": True,
            "uid": info.uid,
            "source": info.source,
            "version": info.version,
            "rank": info.rank,
            "modules": info.modules,
            "data_hash": info.data_hash,
        }

    async def _folders(self) -> list[str]:
        return await asyncio.to_thread(self.adapters.folder_names)

    async def _registered(self):
        """The registry's adapters; callers that ask while a listing runs share it, so a slow
        registry holds one thread, not one per caller."""
        if self._listing is None or self._listing.done():
            self._listing = asyncio.ensure_future(self.adapters.registered())
        return await asyncio.shield(self._listing)


def _reads_back(ref: AdapterRef) -> bool:
    """Whether a request naming `ref` loads it: MLflow takes names that are no reference
    (`my faq`) or read as another (a model named `faq@x` reads as alias x of `faq`)."""
    try:
        return parse_ref(str(ref)) == ref
    except UsageError:
        return False

"""The adapters an engine serves, by the name requests call them.

A name holds one version at a time (an `AdapterInfo`). Loading has two halves: `read` is slow
(registry download, checks, reading weights into host memory) and touches no engine state, so
a server runs it while the engine keeps stepping; `install` is quick and runs between steps.
Requests already running keep the version they started with: they hold its uid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from registry.errors import NotFoundError
from registry.home import Home
from registry.refs import check_adapter_name
from registry.resolve import resolve_adapter
from serve.adapter_pool import AdapterPool
from serve.lora_slots import LoraSlots
from serve.lora_weights import LoraWeights


@dataclass(frozen=True)
class AdapterInfo:
    name: str  # what requests call it
    uid: str  # name or name/version, and a digest of its bytes: slot and prefix-cache key
    source: str  # as given: a registry REF or a folder
    path: Path
    version: int | None  # registry version, None for a folder
    rank: int
    modules: list[str]
    data_hash: str | None = None  # of the data it was trained on, from its lineage if any
    # the registry version's artifact URI: which weights its number meant (a model deleted and
    # registered again numbers its versions from 1 anew)
    artifact: str | None = None


class AdapterCatalog:
    def __init__(
        self,
        pool: AdapterPool,
        slots: LoraSlots,
        base_fingerprint: str,
        tokenizer: dict[str, str],  # the base tokenizer's digests (tokenizer_digests)
        tracking_uri: str | None,
        home: Home,
    ):
        self.pool = pool
        self.slots = slots
        self.base_fingerprint = base_fingerprint
        self.tokenizer = tokenizer
        self.tracking_uri = tracking_uri
        self.home = home
        self.by_name: dict[str, AdapterInfo] = {}

    def read(self, name: str, source: str) -> tuple[AdapterInfo, LoraWeights]:
        """Adapter `name` from a registry REF or a PEFT folder, checked and in host memory."""
        check_adapter_name(name)
        resolved = resolve_adapter(
            source,
            base_fingerprint=self.base_fingerprint,
            tokenizer=self.tokenizer,
            tracking_uri=self.tracking_uri,
            home=self.home,
        )
        # Named by the bytes read: a rewritten folder is another adapter, and so is a registry
        # version whose number came back (its model deleted and registered again). A second
        # look at the folder could find other files than those read.
        label = resolved.version.ref if resolved.version is not None else name
        weights = self.pool.read(resolved.path, label)
        digest = hashlib.sha256(f"{resolved.path}:{weights.stamp}".encode()).hexdigest()[:12]
        uid = weights.uid = f"{label}#{digest}"
        info = AdapterInfo(
            name,
            uid,
            source,
            resolved.path,
            resolved.version.version if resolved.version else None,
            weights.rank,
            weights.modules,
            resolved.lineage.data_hash if resolved.lineage else None,
            resolved.version.source if resolved.version else None,
        )
        return info, weights

    def install(self, loaded: tuple[AdapterInfo, LoraWeights]) -> AdapterInfo:
        """Make a read adapter the one its name serves to new requests."""
        info, weights = loaded
        self.pool.keep(weights)
        previous = self.by_name.get(info.name)
        self.by_name[info.name] = info
        if previous is not None and previous.uid != info.uid:
            self.slots.forget(previous.uid)
        return info

    def unload(self, name: str) -> None:
        info = self.by_name.pop(name, None)
        if info is None:
            raise NotFoundError(f"adapter {name!r} is not loaded")
        self.slots.forget(info.uid)

    def uid_of(self, adapter: str | None, pinned: str | None = None) -> str | None:
        """The version a new request for `adapter` runs on (None: the base): `pinned` (an
        `AdapterInfo.uid` read earlier) while the pool still knows it, else the name's."""
        if adapter is None:
            return None
        if pinned is not None and pinned in self.pool.origin:
            return pinned
        info = self.by_name.get(adapter)
        if info is None:
            loaded = ", ".join(sorted(self.by_name)) or "none"
            raise NotFoundError(f"adapter {adapter!r} is not loaded (loaded: {loaded})")
        return info.uid

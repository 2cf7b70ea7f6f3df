"""One way from what a user names (a registry REF or a PEFT folder) to a checked local folder.

The serving engine and the quality gates load adapters only through `resolve_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from registry.errors import NotFoundError, UnknownAdapterError
from registry.home import Home, expand_user
from registry.lineage import Lineage, check_adapter_folder
from registry.refs import is_ref, parse_ref
from registry.store import AdapterRegistry, AdapterVersion


@dataclass(frozen=True)
class ResolvedAdapter:
    source: str  # as the user wrote it
    path: Path  # local PEFT folder
    version: AdapterVersion | None  # None for a plain folder
    lineage: Lineage | None  # None for an adapter trained outside loraplex


def names_registry(source: str) -> bool:
    """Whether `source` is read from the registry: a reference (a path that starts with `/`,
    `.` or `~` never is one); anything else is a folder."""
    return is_ref(source)


def resolve_adapter(
    source: str,
    *,
    base_fingerprint: str | None = None,
    tokenizer: dict[str, str] | None = None,
    tracking_uri: str | None = None,
    home: Home | None = None,
) -> ResolvedAdapter:
    """Resolve `name`, `name/3`, `name@alias` or a folder path to a verified adapter folder.

    A path is taken as a folder when it looks like one (`/`, `./`, `../`, `~`) or is not a valid
    reference; anything else is looked up in the registry. With `base_fingerprint` (and
    `tokenizer`, its digests), an adapter trained on another base (or tokenizer) is refused.
    """
    if not names_registry(source):
        path = expand_user(source, f"adapter {source!r}")
        if not path.is_dir():
            raise NotFoundError(f"adapter {source!r}: no such folder, and not a registry reference")
        lineage = check_adapter_folder(path, base_fingerprint, tokenizer)
        return ResolvedAdapter(source, path.resolve(), None, lineage)
    registry = AdapterRegistry(tracking_uri, home)
    ref = parse_ref(source)
    try:
        version = registry.get(ref)
    except UnknownAdapterError as error:
        if Path(source).is_dir():  # meant the folder here, which a bare name does not say
            raise UnknownAdapterError(f"{error} (the folder is written './{source}')") from None
        raise
    path = registry.fetch_version(version)  # not `ref` again: an alias may move in between
    lineage = check_adapter_folder(path, base_fingerprint, tokenizer)
    return ResolvedAdapter(source, path, version, lineage)

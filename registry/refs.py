"""Adapter references: `name`, `name/3` (a version) or `name@champion` (an alias)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import UsageError

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
# ASCII of MLflow's word characters and '-' (`2024-q3`, `_rc`); 243: a moved alias leaves a
# `former_<alias>` tag, and MLflow's tag keys hold 250.
_ALIAS = r"[A-Za-z0-9_-]{1,243}"
# A version fits MLflow's int64 (and Python's int() of its digits: a 5,000-digit one raises).
_VERSION = r"[1-9][0-9]{0,17}"
MAX_VERSION = 10**18 - 1
# Matched whole (fullmatch): `$` would let a trailing newline through, "faq\n" a second name.
_REF = re.compile(rf"(?P<name>{_NAME})(?:/(?P<version>{_VERSION})|@(?P<alias>{_ALIAS}))?")
_NAMES = "names: letters, digits, '.', '_' and '-', at most 100"
CHAMPION = "champion"  # the alias a passed gate moves: what a team serves
# MLflow refuses to set these aliases: `latest` (any case) and `v3`, `V3`, ... name versions.
_RESERVED_ALIAS = re.compile(r"(?i:latest)|[vV][0-9]+")


@dataclass(frozen=True)
class AdapterRef:
    name: str
    version: int | None = None  # None with no alias means the latest version
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}/{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def is_ref(text: str) -> bool:
    return _REF.fullmatch(text) is not None


def parse_ref(text: str) -> AdapterRef:
    """Parse a registry reference; the error says which forms are accepted."""
    match = _REF.fullmatch(text)
    if match is None:
        raise UsageError(
            f"adapter reference {text!r} is not NAME, NAME/VERSION or NAME@ALIAS ({_NAMES})"
        )
    version, alias = match["version"], match["alias"]
    if alias is not None:
        check_alias(alias)
    return AdapterRef(match["name"], int(version) if version else None, alias)


def check_alias(alias: str) -> str:
    """Validate an alias to point at a version: MLflow's characters, none of its reserved names."""
    if re.fullmatch(_ALIAS, alias) is None:
        raise UsageError(f"alias {alias!r} must be letters, digits, '_' or '-' (1 to 243 of them)")
    if _RESERVED_ALIAS.fullmatch(alias):
        raise UsageError(
            f"alias {alias!r} is reserved by MLflow ('latest' and v<N>); use NAME for the latest "
            "version, NAME/N for version N, or another alias such as 'champion'"
        )
    return alias


def is_name(text: str) -> bool:
    """Whether `text` is a plain adapter name (no version or alias)."""
    return re.fullmatch(_NAME, text) is not None


def check_name(name: str) -> str:
    """Validate an adapter name (used for configs before anything is trained)."""
    if not is_name(name):
        raise UsageError(f"name {name!r} must be a name ({_NAMES})")
    return name


def check_adapter_name(name: str) -> str:
    """Validate the name an adapter is served under: a plain name, or the registry
    reference it stands for (faq/3), read as a request's `model` will read it."""
    if not is_ref(name):
        raise UsageError(
            f"adapter name {name!r} must be a name ({_NAMES}) or a registry reference it "
            "stands for (NAME/VERSION, NAME@ALIAS)"
        )
    parse_ref(name)  # a reserved alias (faq@v2, faq@latest) is refused as in a reference
    return name

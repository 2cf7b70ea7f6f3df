"""Adapter versions downloaded from a registry into the data home, one folder each.

A version never changes, so its folder is kept and read again by every later load; each
read marks the folder used (its mtime), and `prune` removes those unused for a while. A
removed version only costs a download at its next load: a server holds the weights it
serves in memory, not in these files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from registry.atomic import ABANDONED_SECONDS, PARTIAL


def cached(folder: Path) -> bool:
    """Whether `folder` holds a download; if so, it is marked used now."""
    try:
        os.utime(folder)
    except FileNotFoundError:
        return False
    return folder.is_dir()


@dataclass(frozen=True)
class Pruned:
    removed: int  # versions' folders removed
    removed_bytes: int
    kept: int
    kept_bytes: int


def prune(root: Path, unused_seconds: float) -> Pruned:
    """Remove the downloads under `root` (store/name/version-origin) not used for
    `unused_seconds`, and folders a killed download left."""
    now = time.time()
    removed = removed_bytes = kept = kept_bytes = 0
    for version in sorted(root.glob("*/*/*")):
        abandoned = PARTIAL in version.name and _age(version, now) > ABANDONED_SECONDS
        if PARTIAL in version.name and not abandoned:
            continue  # a download in progress
        size = _size(version)
        if abandoned or _age(version, now) > unused_seconds:
            if _remove(version):
                removed, removed_bytes = removed + 1, removed_bytes + size
        else:
            kept, kept_bytes = kept + 1, kept_bytes + size
    for folder in sorted(root.glob("*/*"), reverse=True) + sorted(root.glob("*")):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty
    return Pruned(removed, removed_bytes, kept, kept_bytes)


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _size(folder: Path) -> int:
    total = 0
    for file in folder.rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile
            total += file.lstat().st_size if file.is_file() else 0
    return total


def _remove(folder: Path) -> bool:
    """Out of its place in one rename (a load finds it whole or not at all), then deleted."""
    doomed = Path(tempfile.mkdtemp(prefix=f"{folder.name}{PARTIAL}", dir=folder.parent))
    try:
        folder.rename(doomed / folder.name)
    except OSError:  # another prune, or a load racing it, got there first
        return False
    finally:
        shutil.rmtree(doomed, ignore_errors=True)
    return True

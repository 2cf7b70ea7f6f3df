"""Adapter versions downloaded from a registry into the data home, one folder each.

A version never changes, so its folder is kept and read again by every later load. Loads
mark the folder used (its mtime), and so does a running server, at each alias poll, for the
versions it serves: its host tier may evict one and read it back. `prune` removes those
unused for a while; a removed one is downloaded again at its next load.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from registry.atomic import PARTIAL, remove_abandoned


def mark_used(folder: Path) -> bool:
    """Mark a downloaded version's folder used now; False if there is none."""
    with contextlib.suppress(OSError):  # none there, or a shared cache not ours to touch
        os.utime(folder)
    return folder.is_dir()


@dataclass(frozen=True)
class Pruned:
    removed: int  # versions' folders removed
    removed_bytes: int
    kept: int
    kept_bytes: int


def prune(root: Path, unused_seconds: float) -> Pruned:
    """Remove the downloads under `root` (store/name/version-origin) not used for
    `unused_seconds`, and what killed downloads left. The store and name folders stay: a
    download may be about to write into one."""
    now = time.time()
    removed = removed_bytes = kept = kept_bytes = 0
    for name in sorted(n for n in root.glob("*/*") if n.is_dir()):
        remove_abandoned(name)
        for version in sorted(v for v in name.iterdir() if v.is_dir() and PARTIAL not in v.name):
            size = _size(version)
            if _age(version, now) > unused_seconds and _remove(version):
                removed, removed_bytes = removed + 1, removed_bytes + size
            else:
                kept, kept_bytes = kept + 1, kept_bytes + size
    return Pruned(removed, removed_bytes, kept, kept_bytes)


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:  # removed meanwhile: nothing to prune
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
    except OSError:  # another prune got there first
        return False
    finally:
        shutil.rmtree(doomed, ignore_errors=True)
    return True

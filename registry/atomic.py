"""Files and folders written whole or not at all, so that a process killed mid-way, or
another one at work on the same path, never leaves or finds half of one."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PARTIAL = ".partial-"  # in the name of a folder still being made
# A partial folder untouched this long belongs to a process killed mid-way (its `finally`
# never ran): what is made so (a download, a conversion) takes seconds to minutes.
ABANDONED_SECONDS = 24 * 3600


def write_file(path: Path, text: str) -> None:
    """`path` holds `text`, or what it held before: never part of it. Its mode is that of a
    file written in place (a temporary file's is owner-only); a failed write leaves nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        # 0o666 less the umask, as a plain write makes it (mkstemp's are owner-only)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_folder(dest: Path, make: Callable[[Path], Path | None], sweep: bool = True) -> Path:
    """`dest`, made by `make(tmp)` in a fresh folder beside it (or in the folder it returns,
    inside tmp) and renamed into place. Two processes making it at once each write their
    own; the one that renames second keeps the first's. With `sweep` (a folder of ours),
    partial folders killed processes left beside it go."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        remove_abandoned(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}{PARTIAL}", dir=dest.parent))
    try:
        made = make(tmp) or tmp
        try:
            made.rename(dest)
        except OSError:
            if not dest.is_dir():  # not another process's finished folder: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def remove_abandoned(folder: Path) -> None:
    """Remove the partial folders in `folder` that processes killed mid-way left."""
    cutoff = time.time() - ABANDONED_SECONDS
    for partial in folder.glob(f"*{PARTIAL}*"):
        try:
            if partial.stat().st_mtime < cutoff:
                shutil.rmtree(partial)
        except OSError:  # another process removed it first, or it is not ours to remove
            pass

"""A training run's folder under the data home: its checkpoints and `run.json`, the record
that `--resume` reads (MLflow run id, status, config, data hash, base fingerprint and
tokenizer digests)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from filelock import FileLock, Timeout

from registry.atomic import write_file
from registry.base_model import tokenizer_differences
from registry.errors import UsageError
from registry.tracking import redacted

RUN_FILE = "run.json"
LOCK_FILE = ".lock"


def new_run_dir(runs: Path) -> Path:
    """A fresh folder under `runs`, named for the time, with an empty `checkpoints/`."""
    runs.mkdir(parents=True, exist_ok=True)
    run_dir = runs / time.strftime("%Y%m%d-%H%M%S")
    while True:
        try:  # made, not checked then made: two jobs started in one second get one each
            run_dir.mkdir()
            break
        except FileExistsError:
            run_dir = run_dir.with_name(run_dir.name + "-1")
    (run_dir / "checkpoints").mkdir()
    return run_dir


def hold(run_dir: Path) -> FileLock:
    """The run folder's lock, held while a job uses it (released when its process ends,
    however it ends); a UsageError if another job holds it."""
    lock = FileLock(run_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(
            f"{run_dir} is in use by another `loraplex train` (still running): it cannot be "
            "resumed until that one ends"
        ) from None
    return lock


# What every record holds, by type; written by train/recipe.py's `_record`.
_REQUIRED = {"run_id": str, "status": str, "config": dict}


def read_record(run_dir: Path) -> dict | None:
    """The folder's record; None before its MLflow run was opened. A UsageError naming the
    file where it is no record (edited by hand, or written by something else)."""
    file = run_dir / RUN_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(
            f"{file}: not a run record ({error}); repair it or remove its run folder"
        ) from None
    wrong = [
        key
        for key, kind in _REQUIRED.items()
        if not isinstance(record, dict) or not isinstance(record.get(key), kind)
    ]
    if wrong:
        raise UsageError(
            f"{file}: not a run record (no {', '.join(wrong)}); repair it or remove its run folder"
        )
    return record


def write_record(run_dir: Path, record: dict) -> None:
    """Written whole or not at all: a job killed while writing leaves the record before."""
    write_file(run_dir / RUN_FILE, json.dumps(record, indent=2) + "\n")


def run_to_resume(runs: Path, now: dict, tracking_uri: str) -> Path:
    """The latest unfinished run under `runs`, if it ran what `now` describes (a record's
    config, data_hash, base_fingerprint and tokenizer digests) and its MLflow run is in the
    store at `tracking_uri`; else a UsageError naming each difference.

    Every config key counts: the checkpoint's optimizer and scheduler would override a new
    learning rate unseen, and the run's MLflow params (logged once) would misreport any
    change. The same config can also name a data file or base folder changed since."""
    unfinished = [
        (d, record)
        for d in sorted(runs.glob("*/"), reverse=True)
        if (record := read_record(d)) is not None and record["status"] != "finished"
    ]
    if not unfinished:
        raise UsageError(f"--resume: no unfinished run of {runs.name!r} in {runs}")
    run_dir, record = unfinished[0]
    store = redacted(tracking_uri)
    if record.get("tracking_uri", store) != store:
        raise UsageError(
            f"--resume: the interrupted run in {run_dir} is in the MLflow store "
            f"{record['tracking_uri']}, not {store}: resume it with --tracking-uri set so"
        )
    saved, current = flatten(record["config"]), flatten(now["config"])
    changed = [
        f"{key} ({saved.get(key)!r} then, {current.get(key)!r} now)"
        for key in sorted(saved.keys() | current.keys())
        if saved.get(key) != current.get(key)
    ]
    for key, what in (
        ("data_hash", "the data's hash"),
        ("base_fingerprint", "the base's fingerprint"),
    ):
        if record.get(key, now[key]) != now[key]:
            changed.append(f"{what} ({record[key]} then, {now[key]} now)")
    for part in tokenizer_differences(record.get("tokenizer") or {}, now["tokenizer"]):
        changed.append(f"the base tokenizer's {part}")
    if changed:
        raise UsageError(
            f"--resume: {', '.join(changed)} differ from the interrupted run in {run_dir}; "
            "a checkpoint only continues the run it came from"
        )
    return run_dir


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested keys joined by dots: {"lora": {"r": 8}} -> {"lora.r": 8}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat

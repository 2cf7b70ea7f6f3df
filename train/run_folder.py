"""A training run's folder under the data home: its checkpoints and `run.json`, the record
that `--resume` reads (MLflow run id, status, config, data hash, base fingerprint and
tokenizer digests)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from registry.base_model import tokenizer_differences
from registry.errors import UsageError

RUN_FILE = "run.json"


def new_run_dir(runs: Path) -> Path:
    """A fresh folder under `runs`, named for the time, with an empty `checkpoints/`."""
    run_dir = runs / time.strftime("%Y%m%d-%H%M%S")
    while run_dir.exists():
        run_dir = run_dir.with_name(run_dir.name + "-1")
    (run_dir / "checkpoints").mkdir(parents=True)
    return run_dir


def read_record(run_dir: Path) -> dict | None:
    """The folder's record; None before its MLflow run was opened."""
    file = run_dir / RUN_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def write_record(run_dir: Path, record: dict) -> None:
    (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")


def run_to_resume(runs: Path, now: dict) -> Path:
    """The latest unfinished run under `runs`, if it ran what `now` describes (a record's
    config, data_hash, base_fingerprint and tokenizer digests); else a UsageError naming
    each difference.

    Every config key counts: the checkpoint's optimizer and scheduler would override a new
    learning rate unseen, and the run's MLflow params (logged once) would misreport any
    change. The same config can also name a data file or base folder changed since."""
    unfinished = [
        d
        for d in sorted(runs.glob("*/"), reverse=True)
        if (record := read_record(d)) is not None and record["status"] != "finished"
    ]
    if not unfinished:
        raise UsageError(f"--resume: no unfinished run of {runs.name!r} in {runs}")
    run_dir = unfinished[0]
    record = read_record(run_dir)
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

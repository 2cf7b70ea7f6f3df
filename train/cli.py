"""`loraplex train CONFIG.yaml [key=value ...]`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from registry.console import TrackingUri, user_errors


def train(
    config: Annotated[Path, typer.Argument(help="Training YAML, e.g. configs/train/X.yaml.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="KEY=VALUE overrides, e.g. training.max_steps=10.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the latest unfinished run of this adapter.")
    ] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Fine-tune a LoRA adapter (QLoRA) from a YAML config and register it as a new version."""
    from registry.home import setup_environment

    with user_errors(tracking_uri):
        home = setup_environment()
        from train.config import load_config

        overrides = overrides or []
        cfg = load_config(config, overrides)
        from train.recipe import TrainingJob

        result = TrainingJob(cfg, tracking_uri=tracking_uri, resume=resume, home=home).run()
        if result.status == "interrupted":
            again = ["loraplex", "train", str(config), *overrides, "--resume"]
            if tracking_uri:  # as given: the environment's variable holds in the next shell too
                again += ["--tracking-uri", tracking_uri]
            print(
                f"interrupted: checkpoint in {result.run_dir / 'checkpoints'}; nothing registered."
                f"\nresume with: {shlex.join(again)}"
            )
            raise typer.Exit(130)
        _print_summary(result)


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result.metrics
    table = Table(title=f"{result.version.name} version {result.version.version} registered")
    table.add_column("validation")
    table.add_column("loss", justify="right")
    table.add_column("perplexity", justify="right")
    for label, prefix in (("base model", "base"), ("adapter", "eval")):
        if f"{prefix}_loss" in m:
            table.add_row(label, f"{m[prefix + '_loss']:.4f}", f"{m[prefix + '_perplexity']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"adapter: {result.adapter_dir}\nMLflow run: {result.run_id}")
    # Last and unwrapped (rich wraps at the terminal's width): what scripts read, e.g. the
    # quality-gate workflow, which gates exactly this version.
    print(f"registered: {result.version.ref}")

"""`loraplex gate CONFIG --candidate NAME/VERSION [--baseline REF] [--promote] [--server URL]`.

Exit codes for CI: 0 the candidate passed, 1 it failed (a bound missed, or a regression past
the tolerance not ruled out), 2 a usage error or a gate that could not run (e.g. an
unreachable registry).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from registry.console import TrackingUri, user_errors
from registry.refs import CHAMPION

log = logging.getLogger(__name__)


def gate(
    config: Annotated[Path, typer.Argument(help="Gate YAML, e.g. configs/gates/X.yaml.")],
    candidate: Annotated[str, typer.Option(help="The version to judge: NAME/VERSION or REF.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="KEY=VALUE overrides, e.g. eval_set.max_samples=8.")
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(help="Compare against this REF (default: NAME@champion).")
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote", help="Move the champion alias to the candidate on pass.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(help="Folder for report.json and report.md (default: in LORAPLEX_HOME)."),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            help="Measure through this running server (e.g. http://host:8000/v1, `loraplex "
            "serve` on the same registry) instead of an engine in this process."
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="LORAPLEX_API_KEY", help="The server's API key.")
    ] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Judge a candidate adapter against its champion and the base.

    Exit 0 if it passes, 1 if it fails (a bound, or a regression not ruled out), 2 if it could
    not run.
    """
    from registry.home import setup_environment

    try:
        with user_errors(tracking_uri):
            home = setup_environment()
            from eval.gate import QualityGate
            from eval.gate_config import load_gate_config

            cfg = load_gate_config(config, overrides or [])
            job = QualityGate(cfg, candidate, baseline, tracking_uri, server, api_key)
            folder = output or home.root / "gates" / job.candidate.name / str(job.candidate.version)
            report = job.run(folder, promote=promote)
    except typer.Exit:
        raise
    except Exception:
        # A crash (the engine, RAGAS, a bug) is a gate that could not run: exit 2, as to CI
        # the 1 of an uncaught exception would read as the candidate's regression.
        log.exception("the gate could not run")
        raise typer.Exit(2) from None
    print(report.to_markdown())
    print(f"report: {folder / 'report.md'}")
    if promote and report.passed:
        print(f"{report.candidate} is now {cfg.adapter}@{CHAMPION}")
    raise typer.Exit(0 if report.passed else 1)

"""Command-line plumbing shared by every subcommand: logging and user-facing errors."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Annotated

import typer

from registry.errors import LoraplexError
from registry.tracking import TRACKING_URI_ENV

TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        envvar=TRACKING_URI_ENV,
        help="MLflow server or store (default: SQLite in LORAPLEX_HOME).",
    ),
]


def setup_logging(verbose: bool = False) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(message)s", handlers=[handler]
    )
    # Noise that says nothing a user can act on: bitsandbytes' optional CPU kernels package,
    # its 4-bit op without a registered autograd kernel (gradients flow to LoRA, not to it),
    # and deprecations inside peft and transformers.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # MLflow sets its own loggers' level when imported (which the commands do later), from
    # this variable: its INFO lines (creating the store's tables, a run's link) only with -v.
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


@contextmanager
def user_errors(tracking_uri: str | None = None):
    """Turn a LoraplexError into its message on stderr and its exit code; Ctrl-C into 130.

    A registry that cannot be reached or refuses a request (MLflow at `tracking_uri`, as the
    command resolves it) is exit code 2 too: to CI, 1 would read as a gate's regression.
    """
    try:
        yield
    except LoraplexError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as e:
        import requests
        from mlflow.exceptions import MlflowException

        if not isinstance(e, (MlflowException, requests.ConnectionError)):
            raise
        from registry.tracking import hide_password, redacted, resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
        reason = hide_password(_first_line(getattr(e, "message", None) or str(e)), uri)
        print(f"error: MLflow at {redacted(uri)}: {reason}", file=sys.stderr)
        raise typer.Exit(2) from None


def _first_line(message: str) -> str:
    """What a one-line error keeps of MLflow's message: its first line, and where that only
    introduces the cause (a download's "The following failures occurred ...:"), the cause."""
    # MLflow heads each failed file "##### File NAME #####"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("#####")]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else message

"""Command-line plumbing shared by every subcommand: logging and user-facing errors."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

import typer

from registry.errors import LoraplexError


def setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(show_time=False, show_path=False, rich_tracebacks=True)],
    )
    # Noise that says nothing actionable to a user on CPU.
    for name in ("bitsandbytes", "transformers.modeling_utils", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def user_errors():
    """Turn a LoraplexError into its message on stderr and its exit code; Ctrl-C into 130."""
    try:
        yield
    except LoraplexError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None

"""`loraplex registry list | show REF | promote NAME VERSION | download REF DIR |
delete NAME/VERSION | prune-cache`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from registry.console import TrackingUri, user_errors
from registry.refs import CHAMPION, MAX_VERSION

app = typer.Typer(no_args_is_help=True, help="Registered adapters and their versions (MLflow).")

Ref = Annotated[str, typer.Argument(help="NAME (latest), NAME/VERSION or NAME@ALIAS.")]


def _registry(tracking_uri: str | None):
    from registry.home import setup_environment
    from registry.store import AdapterRegistry

    return AdapterRegistry(tracking_uri, setup_environment())


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds else ""


@app.command("list")
def list_(tracking_uri: TrackingUri = None) -> None:
    """Registered adapters with their latest version and aliases."""
    from rich.console import Console
    from rich.table import Table

    with user_errors(tracking_uri):
        adapters = _registry(tracking_uri).list()
    table = Table("name", "latest", "aliases", "updated")
    for a in adapters:
        aliases = ", ".join(f"{alias}→{v}" for alias, v in sorted(a.aliases.items()))
        table.add_row(a.name, str(a.latest_version or "-"), aliases, _when(a.updated))
    Console().print(table if adapters else "no registered adapters")


@app.command()
def show(ref: Ref, tracking_uri: TrackingUri = None) -> None:
    """One version: aliases, run, lineage tags and metrics."""
    from rich.console import Console
    from rich.table import Table

    from registry.refs import parse_ref

    with user_errors(tracking_uri):
        registry = _registry(tracking_uri)
        version = registry.get(parse_ref(ref))
        metrics = registry.client.get_run(version.run_id).data.metrics if version.run_id else {}
    table = Table(title=f"{version.name} version {version.version}", show_header=False)
    table.add_row("aliases", ", ".join(version.aliases) or "-")
    table.add_row("created", _when(version.created))
    table.add_row("run", version.run_id or "-")
    table.add_row("source", version.source)
    for key, value in sorted(version.tags.items()):
        table.add_row(key, value)
    for key in sorted(k for k in metrics if k.endswith(("_loss", "_perplexity"))):
        table.add_row(key, f"{metrics[key]:.4f}")
    Console().print(table)


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered adapter name.")],
    version: Annotated[
        int, typer.Argument(help="Version to point the alias at.", min=1, max=MAX_VERSION)
    ],
    alias: Annotated[str, typer.Option(help="Alias to move.")] = CHAMPION,
    tracking_uri: TrackingUri = None,
) -> None:
    """Point an alias (default `champion`) at a version."""
    from registry.errors import UsageError
    from registry.refs import is_name

    with user_errors(tracking_uri):
        if not is_name(name):
            raise UsageError(f"{name!r}: promote takes NAME VERSION, e.g. 'promote faq 3'")
        previous = _registry(tracking_uri).promote(name, version, alias)
    moved = f" (was {previous})" if previous and previous != version else ""
    print(f"{name}@{alias} → version {version}{moved}")


@app.command()
def download(
    ref: Ref,
    dest: Annotated[Path, typer.Argument(help="Folder to write the PEFT adapter into.")],
    tracking_uri: TrackingUri = None,
) -> None:
    """Copy an adapter version (PEFT folder with its lineage) to DEST."""
    from registry.refs import parse_ref

    with user_errors(tracking_uri):
        registry = _registry(tracking_uri)
        version = registry.download(parse_ref(ref), dest)
    print(f"{version.name} version {version.version} → {dest}")


@app.command()
def delete(
    ref: Annotated[str, typer.Argument(help="NAME/VERSION: the version to delete.")],
    force: Annotated[
        bool, typer.Option("--force", help="Delete it even if aliases point at it.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask to confirm.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Delete one version from the registry (its training run stays in MLflow)."""
    from registry.errors import UsageError
    from registry.refs import parse_ref

    with user_errors(tracking_uri):
        parsed = parse_ref(ref)
        if parsed.version is None:
            raise UsageError(f"{ref!r}: name the version to delete, as NAME/VERSION")
        registry = _registry(tracking_uri)
        version = registry.deletable(parsed.name, parsed.version, force)
        if not yes:
            if not _can_ask():
                raise UsageError(f"delete {version.ref}: no terminal to confirm on: pass --yes")
            typer.confirm(f"delete {version.ref} from the registry?", abort=True)
            # Checked again: an alias may have moved onto it while the prompt waited.
            version = registry.deletable(parsed.name, parsed.version, force)
        registry.delete(version)
    aliases = f" (and its alias(es) {', '.join(version.aliases)})" if version.aliases else ""
    print(f"deleted {version.ref}{aliases}")


def _can_ask() -> bool:
    return sys.stdin.isatty()


@app.command("prune-cache")
def prune_cache(
    unused_days: Annotated[
        float, typer.Option(min=0, help="Remove downloads no load read for this many days.")
    ] = 30,
) -> None:
    """Remove adapter versions downloaded from registries that no load read for a while."""
    from registry.download_cache import prune
    from registry.home import Home

    root = Home.from_env().adapters
    pruned = prune(root, unused_days * 86400)
    print(
        f"removed {pruned.removed} downloaded version(s), {_mb(pruned.removed_bytes)}; "
        f"kept {pruned.kept}, {_mb(pruned.kept_bytes)} in {root}"
    )


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"

"""The `loraplex` command: one typer app gathering each package's subcommands.

Only typer is imported here; each command imports torch, peft or mlflow when it runs, so
`loraplex --help` answers at once.
"""

import typer

from eval import cli as eval_cli
from registry import cli as registry_cli
from registry.console import setup_logging
from serve import cli as serve_cli
from train import cli as train_cli

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune LoRA adapters over one base model, register them, gate and serve them.",
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs.")) -> None:
    setup_logging(verbose)


app.command("train")(train_cli.train)
app.add_typer(registry_cli.app, name="registry")
app.command("generate")(serve_cli.generate)
app.command("serve")(serve_cli.serve)
app.command("gate")(eval_cli.gate)

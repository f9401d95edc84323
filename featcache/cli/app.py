"""The ``featcache`` command line: the typer app, with one module per command group beside it, each a
thin layer over the library (parse, call, print)."""

from __future__ import annotations

import typer

from featcache import __version__
from featcache.cli import demo, deploy, evaluate, extract, train
from featcache.cli.console import flag, out
from featcache.cli.manifest import manifest_app

app = typer.Typer(
    name="featcache",
    help=(
        "Cache frozen-backbone image embeddings once, then train and evaluate retrieval heads from the "
        "cache in seconds.\n\n"
        "Stages: [bold]extract[/] (images -> Zarr feature cache), [bold]train-head[/] (cache -> projection "
        "head), [bold]eval[/] (retrieval scores), [bold]export[/] / [bold]index[/] / [bold]search[/] (the trained model "
        "outside featcache). Start with [bold]featcache demo[/]."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

for commands in (extract.app, train.app, evaluate.app, deploy.app, demo.app):  # the order of `featcache --help`
    app.add_typer(commands)
app.add_typer(manifest_app, name="manifest")


@app.callback(invoke_without_command=True)
def _root(version: bool = flag("--version", help="Print the version and exit.", is_eager=True)) -> None:
    if version:
        out.print(f"featcache {__version__}")
        raise typer.Exit()


def main() -> None:
    app()

"""The ``featcache`` command line: the typer app, with one module per command group beside it, each a
thin layer over the library (parse, call, print)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.text import Text

from featcache import __version__
from featcache.cli import demo, deploy, evaluate, extract, serve, train
from featcache.cli.console import err, flag, out
from featcache.cli.manifest import manifest_app

app = typer.Typer(
    name="featcache",
    help=(
        "Cache frozen-backbone image embeddings once, then train and evaluate retrieval heads from the "
        "cache in seconds.\n\n"
        "Stages: [bold]extract[/] (images -> Zarr feature cache), [bold]train-head[/] (cache -> projection "
        "head), [bold]eval[/] (retrieval scores), [bold]export[/] / [bold]index[/] / [bold]search[/] / [bold]serve[/] (the "
        "trained model outside featcache). Start with [bold]featcache demo[/]."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

for commands in (extract.app, train.app, evaluate.app, deploy.app, serve.app, demo.app):  # the order of `featcache --help`
    app.add_typer(commands)
app.add_typer(manifest_app, name="manifest")


@app.callback(invoke_without_command=True)
def _root(
    version: bool = flag("--version", help="Print the version and exit.", is_eager=True),
    storage_options: Optional[str] = typer.Option(
        None, "--storage-options", metavar="JSON",
        help="Options for the filesystem of every s3:// or gs:// URL, as a JSON object (e.g. "
             "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' or '{\"profile\": \"work\"}'); also read from "
             "$FEATCACHE_STORAGE_OPTIONS. Credentials are otherwise found where the storage library looks "
             "(AWS_* variables, ~/.aws profiles, instance roles); featcache never writes them anywhere."),
) -> None:
    if version:
        out.print(f"featcache {__version__}")
        raise typer.Exit()
    if storage_options is not None:
        from featcache.storage import StorageError, configure

        try:
            configure(storage_options)
        except StorageError as e:
            err.print(f"[bold red]error:[/] {Text(str(e)).markup}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


def main() -> None:
    app()

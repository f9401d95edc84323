"""The command line: ``app`` (the typer app) and one module per command group (``extract``, ``train``,
``evaluate``, ``manifest``, ``demo``), with the terminal helpers they share (``console``)."""

from featcache.cli.app import app, main

__all__ = ["app", "main"]

"""Terminal output shared by every command: one-line errors, tables, JSON, progress bars."""

from __future__ import annotations

import contextlib
import errno
import functools
import sys
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from featcache.files import disk_full_error, strict_json

err = Console(stderr=True, soft_wrap=True)  # progress, notes and errors: one line each, never wrapped
out = Console()  # results: tables, or JSON with --json


class UserError(ValueError):
    """Bad input or options: printed as one line, exit status 2."""


def friendly_errors(fn: Callable) -> Callable:
    """Turn our expected errors into ``error: <one line>`` on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:  # our error classes all derive from ValueError
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if message.startswith("Caught ") and "DataLoader worker" in message:  # re-raised from a decoding worker
                original = str(e).strip().splitlines()[-1]
                message = original.split(": ", 1)[1] if ": " in original else original
            err.print(f"[bold red]error:[/] {Text(message).markup}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as e:
            if isinstance(e, PermissionError) and e.filename is None:  # an object store's "access denied"
                err.print(f"[bold red]error:[/] {Text(_first_line(e)).markup} (check the credentials: environment, "
                          "profile or --storage-options)", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = e.filename or "the output"
            err.print(f"[bold red]error:[/] {Text(str(disk_full_error(where))).markup}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def place(value: str | None):
    """An option's path or URL as featcache handles it (``storage.location``): a Path, or a Remote for s3://,
    gs://, ...; None stays None."""
    from featcache.storage import location

    return location(value) if value is not None else None


def break_lock_flag() -> Any:
    return flag("--break-lock", help="On an object store: take the lock of --out even though another writer holds "
                "it (one killed on another host; one killed on this host is recognised without it).")


def allow_break_lock(value: bool) -> None:
    from featcache.storage import configure

    configure(break_lock=value)


def flag(*names: str, help: str, default: bool = False, **kwargs: Any) -> Any:
    """A boolean option (``--json``, ``--quiet``, ...): shown in --help without a value placeholder."""
    return typer.Option(default, *names, help=help, metavar="", **kwargs)


def print_json(obj: Any) -> None:
    sys.stdout.write(strict_json(obj) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: list[str], rows: list[list[Any]], *, justify_numbers: bool = True) -> Table:
    """A results table. Cells and title are plain text: a label like ``[red]`` is data, shown as written,
    never read as rich markup."""
    t = Table(title=Text(title) if title is not None else None, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if justify_numbers and c not in (columns[0],) else "left")
    for r in rows:
        t.add_row(*[Text(fmt(v)) for v in r])
    return t


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


class FieldColumn(ProgressColumn):
    def __init__(self, name: str, style: str = "red"):
        super().__init__()
        self.name, self.style = name, style

    def render(self, task: Task) -> Text:
        value = task.fields.get(self.name)
        return Text("" if value is None else f"{value} {self.name}", style=self.style)


def progress_bar(unit: str = "img", field: str | None = None, disable: bool = False) -> Progress:
    columns: list[ProgressColumn] = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    if field:
        columns.append(FieldColumn(field))
    return Progress(*columns, console=err, disable=disable, transient=False)


@contextlib.contextmanager
def progress_updates(description: str, unit: str = "row", disable: bool = False) -> Iterator[Callable[..., None]]:
    """An ``update(done, total[, description])`` callback for library calls that report progress; the bar
    appears at the first update, so input refused before any work is one line, no half-drawn bar above it."""
    bar = progress_bar(unit, disable=disable)
    task = None

    def update(done: int, total: int, text: str | None = None) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done, total=total, **({"description": text} if text else {}))

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()

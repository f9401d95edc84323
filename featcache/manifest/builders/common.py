"""What every dataset builder shares: the source registry entry, a headed CSV reader, path checks.

A builder turns one source dataset's own annotation files into manifest rows: ``builder(root,
**options) -> Rows``, one file per source in this folder. ``root`` is the dataset's folder as
downloaded; every path in the result is relative to it. Every builder sets ``domain`` and prefixes
each label with it (``products/1234``), so classes of different datasets never collide when
manifests are combined. Bad input raises ``ManifestError`` with one line that names the file and
line (or JSON entry).
"""

from __future__ import annotations

import csv
import inspect
import io
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from featcache.manifest.schema import DEFAULT_SPLIT, ManifestError, Rows, box_problem, escapes_root


@dataclass(frozen=True)
class Builder:
    """A source dataset: its name on the command line, its builder, a one-line summary and the layout
    of the files it reads. The options it takes (beyond root) are the builder's keyword-only arguments."""

    name: str
    func: Callable[..., Rows]
    summary: str
    layout: str

    @property
    def options(self) -> tuple[str, ...]:
        params = inspect.signature(self.func).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def prefix_labels(domain: str, labels: Iterable[str]) -> list[str]:
    """``domain/label`` for every label. Repeated labels share one string object (4M rows, 200k classes)."""
    labels = list(labels)
    full = {lab: f"{domain}/{lab}" for lab in dict.fromkeys(labels)}
    return list(map(full.__getitem__, labels))


def leaves_root(path: str) -> bool:
    """True for a path that is absolute or climbs out of its root with '..'."""
    if not path or os.path.isabs(path) or path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        return True
    return escapes_root(path)


def check_inside_root(path: str, where: str) -> str:
    """``path`` unchanged, or a ManifestError (naming ``where``: file and line) when it leaves the root."""
    if leaves_root(path):
        raise ManifestError(f"{where}: path '{path}' leaves the dataset folder (absolute or '..'); refused")
    return path


def check_box(box, where: str) -> list[float]:
    """``box`` (x1, y1, x2, y2) as floats, or a ManifestError naming ``where`` (file and line or entry)."""
    problem = box_problem(box)
    if problem:
        raise ManifestError(f"{where}: {problem}")
    return [float(v) for v in box]


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ManifestError(f"{path}: not found ({what})")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ManifestError(f"{path}: folder not found ({what})")
    return path


def parse_choices(value: str | Sequence[str] | None, allowed: Sequence[str], option: str, default: Sequence[str]) -> list[str]:
    """A comma-separated string or a list, checked against ``allowed``; duplicates dropped, order kept."""
    if value is None:
        return list(default)
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise ManifestError(f"--{option}: give at least one of {', '.join(allowed)}")
    for s in items:
        if s not in allowed:
            raise ManifestError(f"--{option}: unknown value '{s}' (expected one of {', '.join(allowed)})")
    return list(dict.fromkeys(items))


def first_bad(values: Sequence, bad: Callable[[object], bool]) -> int | None:
    return next((k for k, v in enumerate(values) if bad(v)), None)


class CsvTable:
    """A headed CSV read whole: ``column(name)`` gives a column; ``error(k, ...)`` names record k's line."""

    def __init__(self, path: Path, required: Sequence[str], what: str):
        self.path = require_file(path, what)
        text = path.read_text(encoding="utf-8-sig")
        if not text.strip():
            raise ManifestError(f"{path}: empty file (expected a header with columns {','.join(required)})")
        self.lines: list[str] | None = None
        if '"' not in text:
            # Nothing quoted: a record is a line and a cell is what lies between commas. Columns are
            # then cut straight out of the lines: a 4M-row GLDv2 train.csv reads in 3 s instead of 10.
            text = text.replace("\r\n", "\n")
            lines = text.rstrip("\n").split("\n")
            header, self.lines = lines[0].split(","), lines[1:]
            if "\n\n" in text:  # blank lines
                self.lines = [line for line in self.lines if line]
            self.rows = self.lines
            lengths = {c + 1 for c in map(str.count, self.lines, itertools.repeat(","))}
        else:
            reader = csv.reader(io.StringIO(text, newline=""))
            header = next(reader)
            self.rows = [r for r in reader if r]
            lengths = set(map(len, self.rows))
        self.header = [h.strip() for h in header]
        for name in required:
            self.first_of((name,))
        width = len(self.header)
        if lengths - {width}:
            k = first_bad(self.rows, lambda r: (r.count(",") + 1 if isinstance(r, str) else len(r)) != width)
            found = self.rows[k].count(",") + 1 if self.lines is not None else len(self.rows[k])
            raise self.error(k, f"expected {width} columns ({','.join(self.header)}), found {found}")

    def __len__(self) -> int:
        return len(self.rows)

    def first_of(self, names: Sequence[str]) -> str:
        """The first of ``names`` (spellings of one column in different copies of a dataset) in the header;
        else a ManifestError naming the file's header line."""
        found = next((n for n in names if n in self.header), None)
        if found is None:
            others = "".join(f" (or '{n}')" for n in names[1:])
            raise ManifestError(f"{self.path}:1: missing column '{names[0]}'{others} (header is {','.join(self.header)})")
        return found

    def column(self, name: str) -> list[str]:
        i = self.header.index(name)
        if self.lines is None:
            return [r[i] for r in self.rows]
        if i == 0:
            return [line[: line.index(",")] for line in self.lines] if len(self.header) > 1 else list(self.lines)
        if i == len(self.header) - 1:
            return [line[line.rindex(",") + 1 :] for line in self.lines]
        return [line.split(",")[i] for line in self.lines]

    def line_of(self, k: int) -> int:
        """The file line where record k (0-based, blank lines not counted) ends."""
        with self.path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            next(reader)
            count = -1
            for row in reader:
                if row:
                    count += 1
                    if count == k:
                        return reader.line_num
        return reader.line_num

    def error(self, k: int, message: str, column: str | None = None) -> ManifestError:
        col = f" column '{column}':" if column else ""
        return ManifestError(f"{self.path}:{self.line_of(k)}:{col} {message}")


def check_column(table: CsvTable, name: str, values: list[str], bad: Callable[[str], bool], problem: str) -> None:
    k = first_bad(values, bad)
    if k is not None:
        raise table.error(k, problem.format(value=values[k]), name)


def check_unique(table: CsvTable, name: str, values: list[str]) -> None:
    if len(set(values)) == len(values):
        return
    first: dict[str, int] = {}
    for k, v in enumerate(values):
        if v in first:
            raise table.error(k, f"'{v}' is listed twice (first on line {table.line_of(first[v])})", name)
        first[v] = k


def path_label_csv(path: Path, what: str, path_column: str = "img_path", label_columns: Sequence[str] = ("label",),
                   root_name: str = "dataset folder") -> tuple[list[str], list[str]]:
    """(paths, labels) of a headed CSV that lists one image per row (UniFEx's ``img_path,label`` files; the
    label column is the first of ``label_columns`` present): no empty cells, no path leaving the root, no
    path listed twice; errors name the file and line."""
    table = CsvTable(path, (path_column,), what)
    label_column = table.first_of(label_columns)
    paths = [s.strip() for s in table.column(path_column)]
    labels = [s.strip() for s in table.column(label_column)]
    check_column(table, path_column, paths, lambda s: not s, "empty path")
    check_column(table, path_column, paths, leaves_root, f"path '{{value}}' leaves the {root_name}; refused")
    check_column(table, label_column, labels, lambda s: not s, "empty label")
    check_unique(table, path_column, paths)
    return paths, labels


def image_extensions() -> set[str]:
    from PIL import Image

    Image.init()
    return {e.lower() for e in Image.registered_extensions()}


def scan_class_folders(folder: Path) -> tuple[list[str], list[str], int, int]:
    """``FOLDER/CLASS/IMAGE``: (paths relative to FOLDER, class names, files skipped for their extension,
    files lying directly in FOLDER), in name order."""
    extensions = image_extensions()
    paths: list[str] = []
    classes: list[str] = []
    skipped = loose = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            loose += 1
            continue
        for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if f.name.startswith(".") or not f.is_file():
                continue
            if os.path.splitext(f.name)[1].lower() not in extensions:
                skipped += 1
                continue
            paths.append(f"{entry.name}/{f.name}")
            classes.append(entry.name)
    return paths, classes, skipped, loose


def read_json(path: Path, what: str):
    """A JSON file's value; a syntax error names the file and line."""
    import json

    require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None


def single_split(paths: list[str], labels: list[str], domain: str, boxes: np.ndarray | None = None) -> Rows:
    n = len(paths)
    return Rows(paths, labels, [domain] * n, [DEFAULT_SPLIT] * n, boxes)

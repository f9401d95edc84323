"""What every dataset builder shares: the source registry entry, file readers (text, JSON, a headed CSV)
whose every failure is one line naming the file, path checks.

A builder turns one source dataset's own annotation files into manifest rows: ``builder(root,
**options) -> Rows``, one file per source in this folder. ``root`` is the dataset's folder as
downloaded; every path in the result is relative to it. Every builder sets ``domain`` and prefixes
each label with it (``products/1234``), so classes of different datasets never collide when
manifests are combined. Bad input raises ``ManifestError`` with one line that names the file and
line (or JSON entry).
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import inspect
import io
import itertools
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from featcache.manifest.schema import DEFAULT_SPLIT, ManifestError, Rows, box_problem, decode_utf8, escapes_root


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

    def takes_list(self, option: str) -> bool:
        """Whether ``option`` also takes a list of values (``partition = ["train", "test"]`` in a recipe)."""
        return "Sequence" in str(inspect.signature(self.func).parameters[option].annotation)


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
    """``path`` unchanged, or a ManifestError (naming ``where``: file and line) when it leaves the root or
    holds a NUL character (no file name does)."""
    if leaves_root(path):
        raise ManifestError(f"{where}: path '{path}' leaves the dataset folder (absolute or '..'); refused")
    if "\0" in path:
        raise ManifestError(f"{where}: path {ascii(path)[:120]} holds a NUL character; refused")
    return path


def as_int(text: str) -> int | None:
    """``text`` as a plain decimal integer (ASCII digits, an optional sign), else None: ``int()`` alone also
    takes '²' as a digit and refuses over 4300 of them."""
    text = text.strip()
    if not re.fullmatch(r"[-+]?[0-9]{1,18}", text):
        return None
    return int(text)


def check_box(box, where: str) -> list[float]:
    """``box`` (x1, y1, x2, y2) as floats, or a ManifestError naming ``where`` (file and line or entry)."""
    problem = box_problem(box)
    if problem:
        raise ManifestError(f"{where}: {problem}")
    return [float(v) for v in box]


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        problem = "not a regular file" if path.exists() else "not found"
        raise ManifestError(f"{path}: {problem} ({what})")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ManifestError(f"{path}: folder not found ({what})")
    return path


# While a command records them (``recording_reads``), the files builders read, by (device, inode): the
# command's --out must never be one of them, under whatever name it is given.
_READS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("featcache_builder_reads", default=None)


@contextlib.contextmanager
def recording_reads() -> Iterator[dict[tuple[int, int], Path]]:
    """Within the block, every file read through ``read_bytes`` (and so ``read_text``, ``read_json``,
    ``CsvTable``) is added to the dict this yields: {(device, inode): path}."""
    reads: dict[tuple[int, int], Path] = {}
    token = _READS.set(reads)
    try:
        yield reads
    finally:
        _READS.reset(token)


def read_bytes(path: Path) -> bytes:
    """A source file's bytes. Anything but a regular file (a folder, a FIFO that would block) and any file
    that cannot be read is a one-line error naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ManifestError(f"{path}: not found") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read it ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{path}: not a regular file")
        reads = _READS.get()
        if reads is not None:
            reads[(st.st_dev, st.st_ino)] = path
        try:
            return f.read()
        except OSError as e:
            raise ManifestError(f"{path}: cannot read it ({e.strerror or e})") from None


def read_text(path: Path, what: str) -> str:
    """A source file as UTF-8 text (a BOM dropped); a missing file names ``what`` was expected there, one that is
    not UTF-8 gives ``FILE: not UTF-8 text (byte 0x.. at offset N)``."""
    require_file(path, what)
    return decode_utf8(read_bytes(path), path)


def read_json(path: Path, what: str):
    """A JSON file's value; a file that is not JSON, or nested too deeply to read, is one line naming it.
    Builders check the value's shape themselves (``expect``)."""
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ManifestError(f"{path}: not readable JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ManifestError(f"{path}: not readable JSON ({str(e).splitlines()[0][:100]})") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_text(value, path)
    return value


# \ud800-\udfff: half of a UTF-16 pair; alone in a string, not text that a manifest (UTF-8) can hold
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_text(value, path: Path) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ManifestError(f"{path}: not readable JSON (nested too deeply)") from None
    except UnicodeEncodeError:
        raise ManifestError(f"{path}: a string holds an escaped lone surrogate (\\ud800-\\udfff), which is not text; "
                            "refused") from None


def expect(value, kind: type, where: str, shape: str):
    """``value`` when it is a ``kind`` (dict, list), else a ManifestError naming ``where`` and the ``shape``
    expected there."""
    if isinstance(value, kind):
        return value
    raise ManifestError(f"{where}: expected {shape}, found {json_kind(value)}")


def json_kind(value) -> str:
    """What a JSON value is, in words, for error messages."""
    if isinstance(value, bool):
        return "true/false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return f"a string ({ascii(value)[:50]})"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def shown(value) -> str:
    """A JSON value in an error message: a number or string as written (cut short), a list or object by kind."""
    if isinstance(value, (str, int, float)) or value is None:
        return ascii(value)[:60]
    if isinstance(value, list) and len(value) <= 8 and all(isinstance(v, (str, int, float)) or v is None for v in value):
        return "[" + ", ".join(map(shown, value)) + "]"
    return json_kind(value)


def list_dir(folder: Path) -> list[os.DirEntry]:
    """A folder's entries in name order; one line naming it when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise ManifestError(f"{folder}: cannot list it ({e.strerror or e})") from None


def check_name(entry: os.DirEntry) -> str:
    """A file name read from disk, unless it is not UTF-8 (a manifest is UTF-8 text): then one line naming it."""
    try:
        entry.name.encode("utf-8")
    except UnicodeEncodeError:
        path = os.fsencode(entry.path).decode("utf-8", "backslashreplace")
        raise ManifestError(f"{path}: file name is not UTF-8 (a manifest is UTF-8 text); rename it") from None
    return entry.name


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
        self.path = path
        text = read_text(path, what)
        if not text.strip():
            expected = f"a header with columns {','.join(required)}" if required else what
            raise ManifestError(f"{path}: empty file (expected {expected})")
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
            records = (row for _, row in csv_records(text, path))
            header = next(records)
            self.rows = [r for r in records if r]
            lengths = set(map(len, self.rows))
        self.header = [h.strip() for h in header]
        self.require(required)
        width = len(self.header)
        if lengths - {width}:
            k = first_bad(self.rows, lambda r: (r.count(",") + 1 if isinstance(r, str) else len(r)) != width)
            found = self.rows[k].count(",") + 1 if self.lines is not None else len(self.rows[k])
            raise self.error(k, f"expected {width} columns ({','.join(self.header)}), found {found}")

    def __len__(self) -> int:
        return len(self.rows)

    def require(self, names: Sequence[str]) -> None:
        """Each of ``names`` is a column, else a ManifestError naming the file's header line."""
        for name in names:
            self.first_of((name,))

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
        reader = csv.reader(io.StringIO(decode_utf8(read_bytes(self.path), self.path), newline=""))
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


def csv_records(text: str, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line where it ends, record) for each CSV record of ``text`` (read from ``path``); a record the csv
    module cannot read is one line naming the file and line."""
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # a field over csv.field_size_limit(): usually a quote never closed
            raise ManifestError(f"{path}:{reader.line_num}: not a readable CSV record ({e}; an unclosed quote?)") from None
        yield reader.line_num, row


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
    for entry in list_dir(folder):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            loose += 1
            continue
        for f in list_dir(Path(entry.path)):
            if f.name.startswith(".") or not f.is_file():
                continue
            if os.path.splitext(f.name)[1].lower() not in extensions:
                skipped += 1
                continue
            paths.append(f"{check_name(entry)}/{check_name(f)}")
            classes.append(entry.name)
    return paths, classes, skipped, loose


def single_split(paths: list[str], labels: list[str], domain: str, boxes: np.ndarray | None = None) -> Rows:
    n = len(paths)
    return Rows(paths, labels, [domain] * n, [DEFAULT_SPLIT] * n, boxes)

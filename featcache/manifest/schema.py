"""Manifests: the CSV lists of images that every stage starts from.

One row per image. Columns: ``path`` (relative to a root folder, or absolute) and ``label`` are
required; ``domain`` (default ``default``), ``split`` (``train``/``query``/``index``, default
``train``) and a crop box ``x1,y1,x2,y2`` in pixels are optional. Everything is validated up front so
that a bad row fails in the first second of a run, not hours into it.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from featcache.files import write_file

REQUIRED_COLUMNS = ("path", "label")
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
OPTIONAL_COLUMNS = ("domain", "split", *BOX_COLUMNS)
SPLITS = ("train", "query", "index")
DEFAULT_DOMAIN = "default"
DEFAULT_SPLIT = "train"


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, line and column."""


@dataclass
class Manifest:
    """A validated manifest. Row i here is row i of every cache array built from it."""

    source: Path
    root: Path
    paths: list[str]
    labels: list[str]
    domains: list[str]
    splits: list[str]
    boxes: np.ndarray  # (N, 4) float64, NaN where a row has no box
    classes: list[str] = field(init=False)
    label_ids: np.ndarray = field(init=False)  # (N,) int64 into classes

    def __post_init__(self) -> None:
        self.classes = sort_labels(set(self.labels))
        index = {c: i for i, c in enumerate(self.classes)}
        self.label_ids = np.fromiter(map(index.__getitem__, self.labels), dtype=np.int64, count=len(self.labels))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_boxes(self) -> bool:
        return bool(np.isfinite(self.boxes).any())

    def resolve(self, i: int) -> Path:
        """The file for row i: relative paths are taken from the root."""
        return resolve(self.root, self.paths[i])

    def box(self, i: int) -> tuple[float, float, float, float] | None:
        b = self.boxes[i]
        return None if math.isnan(b[0]) else (float(b[0]), float(b[1]), float(b[2]), float(b[3]))

    def content_sha256(self) -> str:
        """A hash of what the rows say (not of the file's bytes): the manifest part of a cache key."""
        h = hashlib.sha256()
        for i in range(len(self)):
            b = self.boxes[i]
            box = "" if math.isnan(b[0]) else ",".join(repr(float(v)) for v in b)
            h.update(f"{self.paths[i]}\t{self.labels[i]}\t{self.domains[i]}\t{self.splits[i]}\t{box}\n".encode())
        return h.hexdigest()


def sort_labels(labels) -> list[str]:
    """Class order: numeric when every label is an integer (2 before 10), else lexicographic."""
    labels = list(labels)
    try:
        return sorted(labels, key=lambda s: (int(s), s))
    except ValueError:
        return sorted(labels)


def escapes_root(path: str) -> bool:
    """True for a relative path that climbs out of its root with '..' (backslashes count as separators)."""
    if ".." not in path or os.path.isabs(path):
        return False
    norm = os.path.normpath(path.replace("\\", "/"))
    return norm == ".." or norm.startswith("../")


def resolve(root: Path, path: str) -> Path:
    """A manifest path as a file: relative paths are taken from the root, absolute ones as they are."""
    p = Path(path)
    return p if p.is_absolute() else root / p


def _records(reader, source: Path):
    """The CSV reader's rows, with its two ways of failing on a bad file turned into one line each."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a field over csv.field_size_limit(): usually a quote never closed
            raise ManifestError(f"{source}:{reader.line_num}: not a readable CSV record ({e}; an unclosed quote?)") from None
        except UnicodeDecodeError as e:
            raise ManifestError(f"{source}:{_line_of_byte(source)}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                                "save the manifest as UTF-8") from None
        yield row


def _line_of_byte(source: Path) -> int:
    """The line holding the first byte that is not UTF-8 (found again from the file's bytes)."""
    data = source.read_bytes()
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as first:
        return data[: first.start].count(b"\n") + 1
    return 1


def read_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Manifest:
    """Read and validate a manifest CSV. ``root`` defaults to the manifest's own folder."""
    source = Path(path)
    if not source.is_file():
        raise ManifestError(f"{source}: manifest not found")
    root_dir = Path(root) if root is not None else source.parent
    with source.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        records = _records(reader, source)
        try:
            header = [h.strip() for h in next(records)]
        except StopIteration:
            raise ManifestError(f"{source}: empty file (expected a header with columns path,label)") from None
        for col in REQUIRED_COLUMNS:
            if col not in header:
                raise ManifestError(f"{source}:1: missing column '{col}' (header is {','.join(header)})")
        col = {name: header.index(name) for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if name in header}
        box_cols = [c for c in BOX_COLUMNS if c in col]
        if box_cols and len(box_cols) != 4:
            missing = ",".join(c for c in BOX_COLUMNS if c not in col)
            raise ManifestError(f"{source}:1: crop box needs all of x1,y1,x2,y2; missing {missing}")
        ip, il = col["path"], col["label"]
        idom, isplit = col.get("domain"), col.get("split")
        ibox = [col[c] for c in BOX_COLUMNS] if box_cols else None

        paths: list[str] = []
        labels: list[str] = []
        domains: list[str] = []
        splits: list[str] = []
        boxes: list[tuple[float, float, float, float]] = []
        seen: dict[object, int] = {}
        nan_box = (math.nan,) * 4
        width = len(header)
        for row in records:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < width:
                raise ManifestError(f"{source}:{line}: expected {width} columns, found {len(row)}")
            p = row[ip].strip()
            if not p:
                raise ManifestError(f"{source}:{line}: column 'path': empty path")
            if escapes_root(p):
                raise ManifestError(f"{source}:{line}: column 'path': '{p}' leaves the root folder with '..'")
            box = _parse_box(row, ibox, source, line) if ibox else nan_box
            # one image may be several rows, each a crop of another item; the same crop twice is a mistake
            ident = (p, box) if ibox and not math.isnan(box[0]) else p
            if ident in seen:
                what = f"duplicate path '{p}'" if ident is p else f"duplicate row: path '{p}' with the same crop box"
                raise ManifestError(f"{source}:{line}: column 'path': {what} (first on line {seen[ident]})")
            seen[ident] = line
            lab = row[il].strip()
            if not lab:
                raise ManifestError(f"{source}:{line}: column 'label': empty label")
            dom = row[idom].strip() if idom is not None else ""
            spl = row[isplit].strip() if isplit is not None else ""
            spl = spl or DEFAULT_SPLIT
            if spl not in SPLITS:
                raise ManifestError(
                    f"{source}:{line}: column 'split': unknown split '{spl}' (expected one of {', '.join(SPLITS)})"
                )
            paths.append(p)
            labels.append(lab)
            domains.append(dom or DEFAULT_DOMAIN)
            splits.append(spl)
            boxes.append(box)
    if not paths:
        raise ManifestError(f"{source}: no rows")
    return Manifest(
        source=source,
        root=root_dir,
        paths=paths,
        labels=labels,
        domains=domains,
        splits=splits,
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
    )


def _parse_box(row: list[str], ibox: list[int], source: Path, line: int) -> tuple[float, float, float, float]:
    cells = [row[i].strip() for i in ibox]
    if not any(cells):
        return (math.nan,) * 4
    values = []
    for name, cell in zip(BOX_COLUMNS, cells):
        try:
            v = float(cell)
        except ValueError:
            raise ManifestError(f"{source}:{line}: column '{name}': malformed box value '{cell}'") from None
        if not math.isfinite(v) or v < 0:
            raise ManifestError(f"{source}:{line}: column '{name}': box value must be a number >= 0, got '{cell}'")
        values.append(v)
    problem = box_problem(values)
    if problem:
        raise ManifestError(f"{source}:{line}: columns 'x1,y1,x2,y2': {problem}")
    x1, y1, x2, y2 = values
    return x1, y1, x2, y2


def box_problem(box) -> str | None:
    """What is wrong with a crop box (x1, y1, x2, y2 in pixels), or None: the rule every manifest row
    obeys, checked by builders too so that a bad box is reported in its source file."""
    if (not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4
            or not all(isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) for v in box)):
        return f"a box is 4 numbers x1,y1,x2,y2, got {box!r}"[:120]
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) and v >= 0 for v in (x1, y1, x2, y2)):
        return f"box values must be finite numbers >= 0, got ({x1:g},{y1:g},{x2:g},{y2:g})"
    if x2 <= x1 or y2 <= y1:
        return f"empty box ({x1:g},{y1:g},{x2:g},{y2:g}): needs x1 < x2 and y1 < y2"
    return None


def write_manifest(
    out: str | os.PathLike,
    paths,
    labels,
    domains=None,
    splits=None,
    boxes=None,
) -> Path:
    """Write a manifest CSV atomically (a half-written file never replaces a good one).

    ``boxes`` is an (N, 4) array with NaN rows for images without a box; the box columns are written
    only when at least one row has one.
    """
    out = Path(out)
    n = len(paths)
    domains = [DEFAULT_DOMAIN] * n if domains is None else domains
    splits = [DEFAULT_SPLIT] * n if splits is None else splits
    if not (len(labels) == len(domains) == len(splits) == n):
        raise ValueError("paths, labels, domains and splits must have the same length")
    box_arr = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(n, 4)
    with_boxes = box_arr is not None and bool(np.isfinite(box_arr).any())

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["path", "label", "domain", "split", *(BOX_COLUMNS if with_boxes else ())])
            if with_boxes:
                for p, lab, d, s, b in zip(paths, labels, domains, splits, box_arr):
                    box = ["", "", "", ""] if math.isnan(b[0]) else [f"{v:.10g}" for v in b]
                    w.writerow([p, lab, d, s, *box])
            else:
                w.writerows(zip(paths, labels, domains, splits))

    return write_file(out, write)


@dataclass
class Rows:
    """Manifest columns in memory: what builders return, curation filters and ``write`` saves.

    ``boxes`` is None or an (N, 4) float array of x1, y1, x2, y2 with NaN rows for images without one.
    ``notes`` are things the user should hear about that are not errors (rows skipped, and why).
    """

    paths: list[str]
    labels: list[str]
    domains: list[str]
    splits: list[str]
    boxes: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.paths)
        if not (len(self.labels) == len(self.domains) == len(self.splits) == n):
            raise ValueError("paths, labels, domains and splits must have the same length")
        if self.boxes is not None:
            self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(n, 4)

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, keep: np.ndarray) -> Rows:
        """The rows where the boolean mask ``keep`` is true, in their original order."""
        keep = np.asarray(keep, dtype=bool)

        def pick(column: list[str]) -> list[str]:
            return list(itertools.compress(column, keep))

        boxes = None if self.boxes is None else self.boxes[keep]
        return Rows(pick(self.paths), pick(self.labels), pick(self.domains), pick(self.splits), boxes, list(self.notes))

    def with_path_prefix(self, prefix: str) -> Rows:
        """The same rows with ``prefix/`` in front of every path (a source folder under a data root)."""
        prefix = prefix.strip("/")
        paths = self.paths if not prefix else [f"{prefix}/{p}" for p in self.paths]
        return Rows(paths, self.labels, self.domains, self.splits, self.boxes, list(self.notes))

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        """All rows of ``parts`` one after the other; refuses a path that occurs in two parts."""
        parts = list(parts)
        n = sum(len(p) for p in parts)
        boxes = None
        if any(p.boxes is not None for p in parts):
            boxes = np.full((n, 4), np.nan)
            start = 0
            for p in parts:
                if p.boxes is not None:
                    boxes[start : start + len(p)] = p.boxes
                start += len(p)

        def chain(name: str) -> list:
            return list(itertools.chain.from_iterable(getattr(p, name) for p in parts))

        rows = Rows(chain("paths"), chain("labels"), chain("domains"), chain("splits"), boxes, chain("notes"))
        if len(parts) > 1 and len(set(rows.paths)) != n:
            owner: dict[str, int] = {}  # a path may repeat inside one part (crops of one image), not across parts
            for k, part in enumerate(parts):
                for path in part.paths:
                    if owner.setdefault(path, k) != k:
                        raise ManifestError(f"path '{path}' occurs in more than one input")
        return rows

    def write(self, out: str | os.PathLike) -> Path:
        """Write a manifest CSV; an empty result is an error, never an empty file."""
        if not len(self):
            raise ManifestError(f"{out}: nothing to write (no rows left)")
        return write_manifest(out, self.paths, self.labels, self.domains, self.splits, self.boxes)


def rows_from_manifest(m: Manifest) -> Rows:
    return Rows(m.paths, m.labels, m.domains, m.splits, m.boxes if m.has_boxes else None)

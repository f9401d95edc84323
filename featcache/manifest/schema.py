"""Manifests: the CSV lists of images that every stage starts from.

One row per image. Columns: ``path`` (relative to a root folder, or absolute) and ``label`` are
required; ``domain`` (default ``default``), ``split`` (``train``/``query``/``index``, default
``train``) and a crop box ``x1,y1,x2,y2`` in pixels are optional. Everything is validated up front so
that a bad row fails in the first second of a run, not hours into it.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import itertools
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from featcache.files import OutputError, check_writable, write_file
from featcache.storage import Remote, is_url, location

REQUIRED_COLUMNS = ("path", "label")
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
OPTIONAL_COLUMNS = ("domain", "split", *BOX_COLUMNS)
SPLITS = ("train", "query", "index")
DEFAULT_DOMAIN = "default"
DEFAULT_SPLIT = "train"
# The header lines ``write_manifest`` writes: a file that starts with one of them is a manifest featcache made.
WRITTEN_HEADERS = (("path", "label", "domain", "split"), ("path", "label", "domain", "split", *BOX_COLUMNS))


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, line and column."""


@dataclass
class Manifest:
    """A validated manifest. Row i here is row i of every cache array built from it."""

    source: Path | Remote  # a local file, or an object on a store (featcache.storage)
    root: Path | Remote
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

    def resolve(self, i: int) -> Path | Remote:
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


def resolve(root: Path | Remote, path: str) -> Path | Remote:
    """A manifest path as a file: relative paths are taken from the root, absolute ones (and URLs) as they are."""
    if is_url(path):
        return location(path)
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
        except UnicodeDecodeError:
            raise _not_utf8(source) from None
        yield row


UTF8_BOM = b"\xef\xbb\xbf"


def decode_utf8(data: bytes, path: str | os.PathLike, line: bool = False) -> str:
    """``data`` (a file's bytes) as text, a leading BOM dropped; else a one-line error naming ``path``, the
    first byte that is not UTF-8 and its offset (and its line, with ``line``)."""
    start = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    try:
        return str(memoryview(data)[start:], "utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        lines = data.count(b"\n", 0, offset)
        where = f"{path}:{lines + 1}" if line else str(path)
        raise ManifestError(f"{where}: not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset})") from None


def _not_utf8(source: Path) -> ManifestError:
    """The streaming reader only knows the byte's place in its buffer: find it again from the file's bytes."""
    try:
        decode_utf8(source.read_bytes(), source, line=True)
    except ManifestError as e:
        return ManifestError(f"{e}; save the manifest as UTF-8")
    return ManifestError(f"{source}: not UTF-8 text; save the manifest as UTF-8")


def read_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Manifest:
    """Read and validate a manifest CSV. ``root`` defaults to the manifest's own folder."""
    source = location(path)
    if not source.is_file():
        raise ManifestError(f"{source}: manifest not found")
    root_dir = location(root) if root is not None else source.parent
    try:
        f = source.open("r", newline="", encoding="utf-8-sig")
    except OSError as e:
        raise ManifestError(f"{source}: cannot read it ({e.strerror or e})") from None
    with f:
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
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except OverflowError:  # an integer too large for a float (JSON allows any length)
        return "box values must be finite numbers >= 0 (one is too large for a float)"
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
    only when at least one row has one. This writes wherever it is told: commands first ask
    ``check_manifest_out`` whether ``out`` may be replaced.
    """
    out = location(out)
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
            w.writerow(WRITTEN_HEADERS[1] if with_boxes else WRITTEN_HEADERS[0])
            if with_boxes:
                for p, lab, d, s, b in zip(paths, labels, domains, splits, box_arr):
                    box = ["", "", "", ""] if math.isnan(b[0]) else [f"{v:.10g}" for v in b]
                    w.writerow([p, lab, d, s, *box])
            else:
                w.writerows(zip(paths, labels, domains, splits))

    try:
        return write_file(out, write)
    except UnicodeEncodeError:
        raise _not_text(out, {"path": paths, "label": labels, "domain": domains, "split": splits}) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OutputError(f"{out}: cannot write it ({e.strerror or e})") from None


def _not_text(out: Path, columns: dict[str, Sequence[str]]) -> ManifestError:
    """A value that UTF-8 cannot hold (a lone surrogate: an escaped \\udXXX in a JSON file, or a file name that is
    not UTF-8): name its row and column; nothing was written."""
    for name, values in columns.items():
        for k, v in enumerate(values):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return ManifestError(f"{out}: row {k + 1}: {name} {ascii(v)[:120]} is not text UTF-8 can hold "
                                     "(a lone surrogate); nothing was written")
    return ManifestError(f"{out}: a value is not text UTF-8 can hold; nothing was written")


def is_written_manifest(path: str | os.PathLike) -> bool:
    """True when ``path`` is a regular file whose first line is a header ``write_manifest`` writes."""
    headers = {(",".join(h) + "\n").encode() for h in WRITTEN_HEADERS}
    try:
        with location(path).open("rb") as f:
            start = f.read(max(map(len, headers)))
        return any(start.startswith(h) for h in headers)
    except (OSError, ValueError):
        return False


FileIds = Mapping[tuple, Path]  # (device, inode) of a local file, ("url", URL) of an object


def file_ids(paths: Iterable[str | os.PathLike]) -> dict[tuple[int, int], Path]:
    """The (device, inode) of each existing file in ``paths``: another name or a link to one is the same file."""
    ids = {}
    for p in paths:
        if isinstance(p, Remote):  # an object is known by its URL
            ids[("url", p.url)] = p
            continue
        try:
            st = os.stat(p)
        except (OSError, ValueError):
            continue
        ids[(st.st_dev, st.st_ino)] = Path(p)
    return ids


def check_manifest_out(out: str | os.PathLike, *, overwrite: bool, reads: FileIds | None = None) -> None:
    """Refuse to write a manifest at ``out`` unless nothing is there, or a manifest featcache wrote is there and
    ``overwrite`` was given; never over a file the command reads (``reads``), ``overwrite`` or not."""
    out = location(out)
    if isinstance(out, Remote):
        _check_manifest_object(out, overwrite, reads or {})
        return
    try:
        st = out.lstat()
    except FileNotFoundError:
        return
    except OSError as e:  # e.g. a folder on the way is a file
        raise OutputError(f"{out}: cannot write there ({e.strerror or e})") from None
    same = _same_file(out, reads or {})
    if same is not None:
        also = "" if same == out else f" (it is {same})"
        raise OutputError(f"{out} is a file this command reads{also}; nothing was changed: choose another --out")
    if not stat.S_ISREG(st.st_mode) or not is_written_manifest(out):
        kind = ("a link" if stat.S_ISLNK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                else "a file" if stat.S_ISREG(st.st_mode) else "something")
        raise OutputError(f"{out} is {kind} that featcache did not make (a manifest goes there); "
                          "nothing was changed: choose another --out")
    if not overwrite:
        raise OutputError(f"{out} already holds a manifest; pass --overwrite to replace it, or choose another --out")


def _check_manifest_object(out: Remote, overwrite: bool, reads: FileIds) -> None:
    """``check_manifest_out`` for a manifest on an object store."""
    if ("url", out.url) in reads:
        raise OutputError(f"{out} is a file this command reads; nothing was changed: choose another --out")
    if not out.exists():
        check_writable(out, "--out")
        return
    if not out.is_file() or not is_written_manifest(out):
        raise OutputError(f"{out} is {'an object' if out.is_file() else 'a folder'} that featcache did not make (a "
                          "manifest goes there); nothing was changed: choose another --out")
    if not overwrite:
        raise OutputError(f"{out} already holds a manifest; pass --overwrite to replace it, or choose another --out")


def _same_file(out: Path, reads: FileIds) -> Path | None:
    try:
        st = os.stat(out)
    except OSError:
        return None
    return reads.get((st.st_dev, st.st_ino))


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

    def write(self, out: str | os.PathLike, *, overwrite: bool = False, reads: FileIds | None = None) -> Path:
        """Write a manifest CSV where ``check_manifest_out`` allows it; an empty result is an error, never an
        empty file."""
        if not len(self):
            raise ManifestError(f"{out}: nothing to write (no rows left)")
        check_manifest_out(out, overwrite=overwrite, reads=reads)
        return write_manifest(out, self.paths, self.labels, self.domains, self.splits, self.boxes)


def rows_from_manifest(m: Manifest) -> Rows:
    return Rows(m.paths, m.labels, m.domains, m.splits, m.boxes if m.has_boxes else None)

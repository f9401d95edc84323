"""Builders: each source dataset's own annotation files turned into manifest rows.

One function per source, all with the same shape: ``builder(root, **options) -> Rows``. ``root`` is
the dataset's folder as downloaded; every path in the result is relative to it. Every builder sets
``domain`` and prefixes each label with it (``products/1234``), so classes of different datasets
never collide when manifests are combined. ``BUILDERS`` maps the ``featcache manifest build SOURCE``
names to the functions and the options each one takes.

Bad input raises ``ManifestError`` with one line that names the file and line (or JSON entry).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from featcache.manifest import DEFAULT_SPLIT, ManifestError, escapes_root, write_manifest

HEX_DIGITS = b"0123456789abcdefABCDEF"
DIGITS = b"0123456789"


# --------------------------------------------------------------------------------------------------
# Rows: manifest columns in memory


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
            seen: set[str] = set()
            dup = next(p for p in rows.paths if p in seen or seen.add(p))
            raise ManifestError(f"path '{dup}' occurs in more than one input")
        return rows

    def write(self, out: str | os.PathLike) -> Path:
        """Write a manifest CSV; an empty result is an error, never an empty file."""
        if not len(self):
            raise ManifestError(f"{out}: nothing to write (no rows left)")
        return write_manifest(out, self.paths, self.labels, self.domains, self.splits, self.boxes)


# --------------------------------------------------------------------------------------------------
# Shared helpers: written once, used by every builder


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


def gldv2_image_paths(image_ids: Iterable[str], folder: str = "train") -> list[str]:
    """GLDv2 keeps image ``abc123...`` at ``train/a/b/c/abc123....jpg`` (its id's first three characters)."""
    return [f"{folder}/{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in image_ids]


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ManifestError(f"{path}: not found ({what})")
    return path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ManifestError(f"{path}: folder not found ({what})")
    return path


def _parse_choices(value: str | Sequence[str] | None, allowed: Sequence[str], option: str, default: Sequence[str]) -> list[str]:
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


def _first(values: Sequence, bad: Callable[[object], bool]) -> int | None:
    return next((k for k, v in enumerate(values) if bad(v)), None)


class CsvTable:
    """A headed CSV read whole: ``column(name)`` gives a column; ``error(k, ...)`` names record k's line."""

    def __init__(self, path: Path, required: Sequence[str], what: str):
        self.path = _require_file(path, what)
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
            if name not in self.header:
                raise ManifestError(f"{path}:1: missing column '{name}' (header is {','.join(self.header)})")
        width = len(self.header)
        if lengths - {width}:
            k = _first(self.rows, lambda r: (r.count(",") + 1 if isinstance(r, str) else len(r)) != width)
            found = self.rows[k].count(",") + 1 if self.lines is not None else len(self.rows[k])
            raise self.error(k, f"expected {width} columns ({','.join(self.header)}), found {found}")

    def __len__(self) -> int:
        return len(self.rows)

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


def _check_column(table: CsvTable, name: str, values: list[str], bad: Callable[[str], bool], problem: str) -> None:
    k = _first(values, bad)
    if k is not None:
        raise table.error(k, problem.format(value=values[k]), name)


def _check_unique(table: CsvTable, name: str, values: list[str]) -> None:
    if len(set(values)) == len(values):
        return
    first: dict[str, int] = {}
    for k, v in enumerate(values):
        if v in first:
            raise table.error(k, f"'{v}' is listed twice (first on line {table.line_of(first[v])})", name)
        first[v] = k


# --------------------------------------------------------------------------------------------------
# Products-10k


def products10k(root: str | os.PathLike, *, domain: str = "products") -> Rows:
    """Products-10k: ``train.csv`` (``name,class,group``), images under ``train/``; label = class."""
    root = Path(root)
    table = CsvTable(root / "train.csv", ("name", "class"), "Products-10k annotations: train.csv with columns name,class,group")
    names = [s.strip() for s in table.column("name")]
    classes = [s.strip() for s in table.column("class")]
    _check_column(table, "name", names, lambda s: not s, "empty image name")
    _check_column(table, "name", names, leaves_root, "image name '{value}' leaves the dataset folder; refused")
    _check_column(table, "class", classes, lambda s: not s, "empty class")
    _check_unique(table, "name", names)
    paths = [f"train/{n}" for n in names]
    return _single_split(paths, prefix_labels(domain, classes), domain)


# --------------------------------------------------------------------------------------------------
# Google Landmarks v2


def gldv2(root: str | os.PathLike, *, domain: str = "landmarks", annotations: str | None = None) -> Rows:
    """GLDv2: ``train.csv`` (``id,url,landmark_id``; the 2021 Kaggle copy has ``id,landmark_id``) or
    ``train_clean.csv`` (``landmark_id,images`` with space-separated ids); label = landmark id.

    ``annotations`` picks the file; by default train.csv, else train_clean.csv.
    """
    root = Path(root)
    if annotations is None:
        annotations = "train.csv" if (root / "train.csv").is_file() or not (root / "train_clean.csv").is_file() else "train_clean.csv"
    path = root / annotations
    if "images" in _peek_header(path):
        table = CsvTable(path, ("landmark_id", "images"), "GLDv2 annotations: train_clean.csv with columns landmark_id,images")
        groups = table.column("images")
        landmarks = table.column("landmark_id")
        if not _all_digits(landmarks):
            _check_column(table, "landmark_id", landmarks, _not_digits, "landmark id '{value}' is not an integer")
        split_groups = [g.split() for g in groups]
        _check_column(table, "images", split_groups, lambda g: not g, "no image ids")
        ids = list(itertools.chain.from_iterable(split_groups))
        landmarks = list(itertools.chain.from_iterable(itertools.repeat(lab, len(g)) for lab, g in zip(landmarks, split_groups)))
        if not _all_image_ids(ids):
            k = next(k for k, g in enumerate(split_groups) if not _all_image_ids(g))
            bad = next(i for i in split_groups[k] if not _all_image_ids([i]))
            raise table.error(k, f"image id '{bad}' is not a GLDv2 id (hex digits, at least 3)", "images")
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            k = next(k for k, g in enumerate(split_groups) if dup in g)
            raise table.error(k, f"image id '{dup}' is listed twice", "images")
    else:
        table = CsvTable(path, ("id", "landmark_id"), "GLDv2 annotations: train.csv with columns id,url,landmark_id")
        ids = table.column("id")
        landmarks = table.column("landmark_id")
        if not _all_image_ids(ids):
            _check_column(table, "id", ids, lambda s: not _all_image_ids([s]), "image id '{value}' is not a GLDv2 id (hex digits, at least 3)")
        if not _all_digits(landmarks):
            _check_column(table, "landmark_id", landmarks, _not_digits, "landmark id '{value}' is not an integer")
        _check_unique(table, "id", ids)
    paths = gldv2_image_paths(ids)
    return _single_split(paths, prefix_labels(domain, landmarks), domain)


def _only(values: Sequence[str], allowed: bytes) -> bool:
    """Every character of every value is one of ``allowed`` (in bulk: one join, one C-level pass)."""
    joined = "".join(values)
    return joined.isascii() and not joined.encode("ascii").translate(None, allowed)


def _all_image_ids(ids: Sequence[str]) -> bool:
    """Every id is hex digits and at least 3 long."""
    return bool(ids) and min(map(len, ids)) >= 3 and _only(ids, HEX_DIGITS)


def _all_digits(values: Sequence[str]) -> bool:
    return bool(values) and min(map(len, values)) > 0 and _only(values, DIGITS)


def _not_digits(s: str) -> bool:
    return not _all_digits([s])


def _peek_header(path: Path) -> list[str]:
    _require_file(path, "GLDv2 annotations: train.csv (id,url,landmark_id) or train_clean.csv (landmark_id,images)")
    with path.open(newline="", encoding="utf-8-sig") as f:
        return [h.strip() for h in next(csv.reader(f), [])]


# --------------------------------------------------------------------------------------------------
# DeepFashion consumer-to-shop

DEEPFASHION_STATUSES = ("train", "val", "test")


def deepfashion_c2s(root: str | os.PathLike, *, domain: str = "apparel", partition: str | Sequence[str] | None = None) -> Rows:
    """DeepFashion consumer-to-shop: ``Eval/list_eval_partition.txt`` lists (consumer, shop, item id,
    status) pairs; one row per distinct image, label = item id.

    ``partition`` picks the statuses (train, val, test; default train). Rows of train pairs get split
    ``train``; in val and test pairs the consumer photo is a ``query`` and the shop photo ``index``,
    the benchmark's own retrieval protocol. (The dataset spells consumer "comsumer" in its paths.)
    """
    root = Path(root)
    statuses = set(_parse_choices(partition, DEEPFASHION_STATUSES, "partition", ("train",)))
    path = _require_file(root / "Eval" / "list_eval_partition.txt", "DeepFashion consumer-to-shop: Eval/list_eval_partition.txt")
    with path.open(encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) < 2:
        raise ManifestError(f"{path}: too short (expected a count line, a header line, then one line per pair)")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise ManifestError(f"{path}:1: expected the number of pairs, found '{lines[0].strip()}'") from None
    header = lines[1].split()
    if header != ["image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status"]:
        raise ManifestError(f"{path}:2: expected header 'image_pair_name_1 image_pair_name_2 item_id evaluation_status', found '{lines[1].strip()}'")
    where: dict[str, tuple[int, str, str]] = {}  # path -> (line, label, split)
    pairs = 0
    for number, text in enumerate(lines[2:], start=3):
        cells = text.split()
        if not cells:
            continue
        pairs += 1
        if len(cells) != 4:
            raise ManifestError(f"{path}:{number}: expected 4 fields (consumer shop item_id status), found {len(cells)}")
        consumer, shop, item, status = cells
        if status not in DEEPFASHION_STATUSES:
            raise ManifestError(f"{path}:{number}: unknown evaluation_status '{status}' (expected train, val or test)")
        if status not in statuses:
            continue
        for image, split in ((consumer, "query"), (shop, "index")):
            check_inside_root(image, f"{path}:{number}")
            split = "train" if status == "train" else split
            if image in where:
                first, label0, split0 = where[image]
                if label0 != item:
                    raise ManifestError(f"{path}:{number}: image '{image}' has item id {item} here but {label0} on line {first}")
                if split0 != split:
                    raise ManifestError(f"{path}:{number}: image '{image}' is a {split} image here but a {split0} image on line {first}")
                continue
            where[image] = (number, item, split)
    if pairs != declared:
        raise ManifestError(f"{path}:1: the file says {declared} pairs but lists {pairs} (truncated or edited?)")
    if not where:
        raise ManifestError(f"{path}: no pairs with evaluation_status {', '.join(sorted(statuses))}")
    paths = list(where)
    labels = prefix_labels(domain, (where[p][1] for p in paths))
    return Rows(paths, labels, [domain] * len(paths), [where[p][2] for p in paths])


# --------------------------------------------------------------------------------------------------
# Stanford Cars

CARS_PARTITIONS = {  # partition -> (annotation file, image folder)
    "train": ("cars_train_annos.mat", "cars_train"),
    "test": ("cars_test_annos_withlabels.mat", "cars_test"),
}
CARS_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def stanford_cars(
    root: str | os.PathLike,
    *,
    domain: str = "cars",
    partition: str | Sequence[str] | None = None,
    colors: str | os.PathLike | None = None,
) -> Rows:
    """Stanford Cars devkit: ``cars_train_annos.mat`` / ``cars_test_annos_withlabels.mat`` (bbox,
    1-based class, file name) and ``cars_meta.mat`` (class names), found in ROOT or ROOT/devkit;
    images in ``cars_train/`` and ``cars_test/``. Label = model name; boxes go to x1,y1,x2,y2 as the
    devkit gives them (pixels).

    ``colors`` is a CSV of (image, colour) pairs that refines classes to model x colour
    (``cars/<model>/<colour>``); images without a colour are left out (and counted in the notes).
    """
    root = Path(root)
    parts = _parse_choices(partition, tuple(CARS_PARTITIONS), "partition", ("train",))
    class_names = _cars_class_names(_find_devkit_file(root, "cars_meta.mat"))
    paths: list[str] = []
    models: list[str] = []
    boxes: list[np.ndarray] = []
    for part in parts:
        mat_name, folder = CARS_PARTITIONS[part]
        mat = _find_devkit_file(root, mat_name)
        ann = _mat_struct(mat, "annotations", CARS_FIELDS)
        fnames = [str(v).strip() for v in ann["fname"]]
        for k, name in enumerate(fnames):
            check_inside_root(name, f"{mat}: annotation {k + 1}")
        try:
            cls = np.asarray(ann["class"], dtype=np.int64)
            box = np.stack([np.asarray(ann[f], dtype=np.float64) for f in CARS_FIELDS[:4]], axis=1)
        except (TypeError, ValueError):
            raise ManifestError(f"{mat}: annotations: class and bbox fields must be numbers") from None
        bad = np.flatnonzero((cls < 1) | (cls > len(class_names)))
        if bad.size:
            k = int(bad[0])
            raise ManifestError(f"{mat}: annotation {k + 1} ({fnames[k]}): class {cls[k]} is outside 1..{len(class_names)} of cars_meta.mat")
        paths += [f"{folder}/{n}" for n in fnames]
        models += [class_names[c - 1] for c in cls]
        boxes.append(box)
    box_arr = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    notes: list[str] = []
    if colors is not None:
        colour_of, notes = _car_colours(Path(colors), paths)
        keep = np.array([p in colour_of for p in paths], dtype=bool)
        models = [f"{m}/{colour_of[p]}" for m, p in zip(models, paths) if p in colour_of]
        paths = [p for p in paths if p in colour_of]
        box_arr = box_arr[keep]
    rows = _single_split(paths, prefix_labels(domain, models), domain, box_arr)
    rows.notes = notes
    return rows


def _find_devkit_file(root: Path, name: str) -> Path:
    for folder in (root, root / "devkit"):
        if (folder / name).is_file():
            return folder / name
    raise ManifestError(f"{root / name}: not found (also looked in {root / 'devkit'}; Stanford Cars devkit file)")


def _load_mat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(path, squeeze_me=True, struct_as_record=True)
    except Exception as e:  # scipy raises several types for files that are not MATLAB files
        raise ManifestError(f"{path}: not a readable MATLAB .mat file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _mat_struct(path: Path, variable: str, fields: Sequence[str]) -> dict[str, np.ndarray]:
    """The fields of a MATLAB struct array as 1-D arrays; says which variable or field is missing."""
    mat = _load_mat(path)
    if variable not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise ManifestError(f"{path}: no variable '{variable}' (variables: {found})")
    struct = np.atleast_1d(mat[variable])
    names = struct.dtype.names or ()
    for name in fields:
        if name not in names:
            raise ManifestError(f"{path}: '{variable}' has no field '{name}' (fields: {', '.join(names) or 'none'})")
    return {name: np.atleast_1d(struct[name]).ravel() for name in fields}


def _cars_class_names(path: Path) -> list[str]:
    mat = _load_mat(path)
    if "class_names" not in mat:
        raise ManifestError(f"{path}: no variable 'class_names' (variables: {', '.join(k for k in mat if not k.startswith('__')) or 'none'})")
    names = [str(n).strip() for n in np.atleast_1d(mat["class_names"]).ravel()]
    if not names or any(not n for n in names):
        raise ManifestError(f"{path}: 'class_names' has empty entries")
    return names


def _car_colours(path: Path, paths: list[str]) -> tuple[dict[str, str], list[str]]:
    """Read the (image, colour) CSV; keys may be manifest paths (cars_train/00001.jpg) or bare file
    names when those are unambiguous. Returns {manifest path: colour} and notes."""
    _require_file(path, "colour refinement: CSV of image,colour pairs")
    with path.open(newline="", encoding="utf-8-sig") as f:
        records = [(reader_line, row) for reader_line, row in _numbered_rows(csv.reader(f))]
    if records and [c.strip().lower() for c in records[0][1]][:2] in (["image", "colour"], ["image", "color"], ["fname", "color"], ["fname", "colour"], ["path", "color"], ["path", "colour"]):
        records = records[1:]
    by_name: dict[str, list[str]] = {}
    for p in paths:
        by_name.setdefault(p.rsplit("/", 1)[-1], []).append(p)
    known = set(paths)
    colour_of: dict[str, str] = {}
    unknown = 0
    for line, row in records:
        if len(row) != 2:
            raise ManifestError(f"{path}:{line}: expected 2 columns (image,colour), found {len(row)}")
        image, colour = row[0].strip(), row[1].strip().lower()
        if not image or not colour:
            raise ManifestError(f"{path}:{line}: empty {'image' if not image else 'colour'}")
        check_inside_root(image, f"{path}:{line}")
        if image in known:
            targets = [image]
        else:
            targets = by_name.get(image, [])
            if len(targets) > 1:
                raise ManifestError(f"{path}:{line}: '{image}' is ambiguous ({' and '.join(targets)}); write the folder too")
        if not targets:
            unknown += 1
            continue
        if targets[0] in colour_of and colour_of[targets[0]] != colour:
            raise ManifestError(f"{path}:{line}: '{image}' has colour '{colour}' here but '{colour_of[targets[0]]}' earlier")
        colour_of[targets[0]] = colour
    notes = []
    missing = sum(1 for p in paths if p not in colour_of)
    if missing:
        notes.append(f"{missing} of {len(paths)} images have no colour in {path} and were left out")
    if unknown:
        notes.append(f"{unknown} rows of {path} name images that are not in the selected partitions")
    return colour_of, notes


def _numbered_rows(reader) -> Iterable[tuple[int, list[str]]]:
    for row in reader:
        if row and any(c.strip() for c in row):
            yield reader.line_num, row


# --------------------------------------------------------------------------------------------------
# UnED (Ypsilantis et al., ICCV 2023)

UNED_DOMAINS = ("cars", "sop", "inshop", "inat", "met", "gldv2", "food2k", "rp2k")
UNED_PARTITIONS = ("train", "val", "test")
# Which split files are the queries and the index of each domain's kNN evaluation, as in the
# benchmark's universal_embedding/dataset_infos.py ('knn' -> 'val_knn' / 'test_knn'). None: the
# queries are their own index (each query searches the others, itself excluded).
UNED_KNN = {
    "val": {d: ("val", "small_index" if d == "met" else None) for d in UNED_DOMAINS},
    "test": {d: ("test", "index" if d in ("inshop", "met", "gldv2") else None) for d in UNED_DOMAINS},
}
UNED_INFO_URL = "https://cmp.felk.cvut.cz/univ_emb/info_files.zip"


def uned(
    root: str | os.PathLike,
    *,
    domain: str | Sequence[str] | None = None,
    partition: str | None = None,
    info_dir: str | os.PathLike | None = None,
) -> Rows:
    """UnED: the benchmark's published split files ``info_files/<domain>/<split>.json``, each a JSON
    list of ``{"path": ..., "class_id": ...}`` with paths relative to the ``images/`` folder.

    ``root`` is the UnED data folder holding ``images/`` and (unless ``info_dir`` says otherwise)
    ``info_files/``; manifest paths are ``images/<path>``. ``partition`` is ``test`` (default: the
    benchmark's queries and index), ``val``, or ``train`` (the 2.8M training images, split ``train``).
    In test/val the query files become split ``query`` and the index files split ``index``; domains
    whose queries are their own index (cars, sop, inat, food2k, rp2k) have only ``query`` rows, each
    to be searched against the others. ``domain`` picks UnED domains (default all 8); each is both the
    manifest domain and the label prefix (``cars/17``). A query with several class ids (a JSON list)
    gets them joined with ``|`` (``gldv2/12|gldv2/40``): relevant when any one matches.
    """
    root = Path(root)
    domains = _parse_choices(domain, UNED_DOMAINS, "domain", UNED_DOMAINS)
    part = _parse_choices(partition, UNED_PARTITIONS, "partition", ("test",))
    if len(part) != 1:
        raise ManifestError("--partition: UnED takes one of train, val, test")
    part = part[0]
    info = Path(info_dir) if info_dir is not None else root / "info_files"
    _require_dir(info, f"UnED split files; download and unzip {UNED_INFO_URL} into {root}")
    images = root / "images"
    parts: list[Rows] = []
    seen: dict[str, Path] = {}
    for d in domains:
        files = [("train", "train")] if part == "train" else [(UNED_KNN[part][d][0], "query")]
        if part != "train" and UNED_KNN[part][d][1]:
            files.append((UNED_KNN[part][d][1], "index"))
        for stem, split in files:
            path = info / d / f"{stem}.json"
            rel, labels = _uned_split_file(path, d)
            if d == "rp2k" and images.is_dir():
                rel = [_rp2k_on_disk(images, p) for p in rel]
            paths = [f"images/{p}" for p in rel]
            for p in paths:
                if p in seen:
                    raise ManifestError(f"{path}: image '{p}' is also listed in {seen[p]}")
                seen[p] = path
            parts.append(Rows(paths, labels, [d] * len(paths), [split] * len(paths)))
    rows = Rows.concat(parts)
    if not len(rows):
        raise ManifestError(f"{info}: the UnED split files list no images")
    return rows


def _uned_split_file(path: Path, domain: str) -> tuple[list[str], list[str]]:
    _require_file(path, f"UnED split file; download and unzip {UNED_INFO_URL}")
    try:
        with path.open(encoding="utf-8") as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(entries, list):
        raise ManifestError(f"{path}: expected a JSON list of {{\"path\", \"class_id\"}} objects, found {type(entries).__name__}")
    paths: list[str] = []
    labels: list[str] = []
    prefix = f"{domain}/"
    for k, e in enumerate(entries, start=1):
        where = f"{path}: entry {k}"
        if not isinstance(e, dict) or "path" not in e or "class_id" not in e:
            raise ManifestError(f"{where}: expected an object with keys 'path' and 'class_id', found {json.dumps(e)[:80]}")
        p, cid = e["path"], e["class_id"]
        if not isinstance(p, str) or not p.strip():
            raise ManifestError(f"{where}: 'path' must be a non-empty string")
        check_inside_root(p, where)
        ids = cid if isinstance(cid, list) else [cid]
        if not ids or not all(_is_class_id(c) for c in ids):
            raise ManifestError(f"{where}: 'class_id' must be an integer or a list of integers, found {json.dumps(cid)}")
        paths.append(p)
        labels.append("|".join(prefix + str(int(c)) for c in ids))
    return paths, labels


def _is_class_id(c) -> bool:
    if isinstance(c, bool):
        return False
    if isinstance(c, int):
        return True
    return isinstance(c, str) and c.strip().lstrip("-").isdigit()


def _rp2k_escape(path: str) -> str:
    """RP2K's file names as they come out of its zip on some systems: non-ASCII characters written as
    ``#Uxxxx`` (what the benchmark's own loader falls back to)."""
    out = []
    for ch in path:
        o = ord(ch)
        out.append(ch if o < 128 else f"#U{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
    return "".join(out)


def _rp2k_on_disk(images: Path, path: str) -> str:
    if path.isascii() or (images / path).exists():
        return path
    escaped = _rp2k_escape(path)
    return escaped if (images / escaped).exists() else path


# --------------------------------------------------------------------------------------------------
# A folder per class


def imagefolder(root: str | os.PathLike, *, domain: str | None = None) -> Rows:
    """``ROOT/CLASS/*.jpg`` (any extension Pillow reads); label = the class folder's name. ``domain``
    defaults to ROOT's own name."""
    from PIL import Image

    root = Path(root)
    _require_dir(root, "image folder: one subfolder per class")
    Image.init()
    extensions = {e.lower() for e in Image.registered_extensions()}
    domain = domain or root.resolve().name or "images"
    paths: list[str] = []
    classes: list[str] = []
    skipped = 0
    loose = 0
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
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
    if not paths:
        raise ManifestError(f"{root}: no images in class folders (expected ROOT/CLASS/IMAGE.jpg)")
    rows = _single_split(paths, prefix_labels(domain, classes), domain)
    if skipped:
        rows.notes.append(f"skipped {skipped} files whose extension Pillow does not read")
    if loose:
        rows.notes.append(f"ignored {loose} files directly in {root} (images belong in a folder per class)")
    return rows


def _single_split(paths: list[str], labels: list[str], domain: str, boxes: np.ndarray | None = None) -> Rows:
    n = len(paths)
    return Rows(paths, labels, [domain] * n, [DEFAULT_SPLIT] * n, boxes)


# --------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Builder:
    """A source dataset: its builder, the options it takes (beyond root), and a one-line summary."""

    func: Callable[..., Rows]
    options: tuple[str, ...]
    summary: str
    layout: str


BUILDERS: dict[str, Builder] = {
    "products10k": Builder(products10k, ("domain",), "Products-10k (domain products)", "train.csv (name,class,group), train/"),
    "gldv2": Builder(gldv2, ("domain", "annotations"), "Google Landmarks v2 (domain landmarks)",
                     "train.csv (id,url,landmark_id) or train_clean.csv (landmark_id,images), train/a/b/c/abc....jpg"),
    "deepfashion-c2s": Builder(deepfashion_c2s, ("domain", "partition"), "DeepFashion consumer-to-shop (domain apparel)",
                               "Eval/list_eval_partition.txt, img/"),
    "stanford-cars": Builder(stanford_cars, ("domain", "partition", "colors"), "Stanford Cars devkit (domain cars)",
                             "[devkit/]cars_meta.mat, cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/, cars_test/"),
    "uned": Builder(uned, ("domain", "partition", "info_dir"), "UnED benchmark splits (8 domains)",
                    "info_files/<domain>/{train,val,test,index}.json, images/"),
    "imagefolder": Builder(imagefolder, ("domain",), "a folder per class (domain = folder name)", "CLASS/*.jpg"),
}


def build(source: str, root: str | os.PathLike, **options) -> Rows:
    """Run the builder registered as ``source`` with the options it takes (None values are left out)."""
    if source not in BUILDERS:
        raise ManifestError(f"unknown source '{source}' (expected one of {', '.join(BUILDERS)})")
    builder = BUILDERS[source]
    given = {k: v for k, v in options.items() if v is not None}
    for name in given:
        if name not in builder.options:
            takes = ", ".join(f"--{o.replace('_', '-')}" for o in builder.options) or "no options"
            raise ManifestError(f"--{name.replace('_', '-')} does not apply to {source} (it takes {takes})")
    rows = builder.func(root, **given)
    if not len(rows):
        raise ManifestError(f"{root}: {source} found no images")
    return rows

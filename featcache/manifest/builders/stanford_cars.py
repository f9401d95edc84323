"""Stanford Cars, in either layout it circulates in (detected from the files present): the devkit's
``.mat`` annotation files, or the CSV copy that the original code (UniFEx) read (``sc_train.csv``:
``,x1,y1,x2,y2,Label,image``, images in ``cars_train/`` or the Kaggle copy's ``cars_train/cars_train/``);
and an optional colour CSV that refines classes to model x colour (M4D-35k's cars)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from featcache.manifest.builders.common import (
    Builder,
    CsvTable,
    as_int,
    check_box,
    check_column,
    check_inside_root,
    check_unique,
    csv_records,
    leaves_root,
    parse_choices,
    prefix_labels,
    read_bytes,
    read_text,
    single_split,
)
from featcache.manifest.schema import ManifestError, Rows, box_problem

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
    parts = parse_choices(partition, tuple(CARS_PARTITIONS), "partition", ("train",))
    devkit = any((folder / CARS_PARTITIONS[p][0]).is_file() for p in parts for folder in (root, root / "devkit"))
    if not devkit and any((root / f"sc_{p}.csv").is_file() for p in parts):
        paths, models, box_arr = _cars_csv(root, parts)
    else:
        paths, models, box_arr = _cars_devkit(root, parts)
    notes: list[str] = []
    if colors is not None:
        colour_of, notes = _car_colours(Path(colors), paths)
        keep = np.array([p in colour_of for p in paths], dtype=bool)
        models = [f"{m}/{colour_of[p]}" for m, p in zip(models, paths) if p in colour_of]
        paths = [p for p in paths if p in colour_of]
        box_arr = box_arr[keep]
    rows = single_split(paths, prefix_labels(domain, models), domain, box_arr)
    rows.notes = notes
    return rows


def _cars_devkit(root: Path, parts: list[str]) -> tuple[list[str], list[str], np.ndarray]:
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
        except (TypeError, ValueError, OverflowError):
            raise ManifestError(f"{mat}: annotations: class and bbox fields must be numbers") from None
        bad = np.flatnonzero((cls < 1) | (cls > len(class_names)))
        if bad.size:
            k = int(bad[0])
            raise ManifestError(f"{mat}: annotation {k + 1} ({fnames[k]}): class {cls[k]} is outside 1..{len(class_names)} of cars_meta.mat")
        for k, b in enumerate(box):
            check_box(b, f"{mat}: annotation {k + 1} ({fnames[k]}): bbox")
        paths += [f"{folder}/{n}" for n in fnames]
        models += [class_names[c - 1] for c in cls]
        boxes.append(box)
    return paths, models, np.concatenate(boxes) if boxes else np.zeros((0, 4))


def _cars_csv(root: Path, parts: list[str]) -> tuple[list[str], list[str], np.ndarray]:
    """``sc_PART.csv``: label = the Label (or Class) column, the model's name when ``cars_meta.mat`` is
    at hand (refined labels such as ``14_8`` keep their colour part: ``NAME/8``); boxes as listed."""
    meta = next((f / "cars_meta.mat" for f in (root, root / "devkit") if (f / "cars_meta.mat").is_file()), None)
    class_names = _cars_class_names(meta) if meta else None
    paths: list[str] = []
    models: list[str] = []
    boxes: list[list[float]] = []
    for part in parts:
        path = root / f"sc_{part}.csv"
        table = CsvTable(path, ("x1", "y1", "x2", "y2", "image"), f"Stanford Cars CSV copy: sc_{part}.csv with columns x1,y1,x2,y2,Label,image")
        label = table.first_of(("Label", "Class"))
        folder = CARS_PARTITIONS[part][1]
        folder = f"{folder}/{folder}" if (root / folder / folder).is_dir() else folder
        images = [s.strip() for s in table.column("image")]
        labels = [s.strip() for s in table.column(label)]
        check_column(table, "image", images, lambda s: not s, "empty image name")
        check_column(table, "image", images, leaves_root, "image '{value}' leaves the dataset folder; refused")
        check_column(table, label, labels, lambda s: not s, "empty label")
        check_unique(table, "image", images)
        try:
            box = np.stack([np.asarray(table.column(c), dtype=np.float64) for c in ("x1", "y1", "x2", "y2")], axis=1)
        except ValueError:
            k = next(k for k in range(len(table)) if not all(_is_number(table.column(c)[k]) for c in ("x1", "y1", "x2", "y2")))
            raise table.error(k, "x1,y1,x2,y2 must be numbers") from None
        for k, b in enumerate(box):
            if box_problem(b):
                raise table.error(k, box_problem(b))
        for k, lab in enumerate(labels):
            model, _, colour = lab.partition("_")
            if class_names is not None:
                number = as_int(model)
                if number is None or not 1 <= number <= len(class_names):
                    raise table.error(k, f"class {model} is outside 1..{len(class_names)} of {meta}", label)
                model = class_names[number - 1]
            models.append(f"{model}/{colour}" if colour else model)
        paths += [f"{folder}/{i}" for i in images]
        boxes.append(box)
    return paths, models, np.concatenate(boxes)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _find_devkit_file(root: Path, name: str) -> Path:
    for folder in (root, root / "devkit"):
        if (folder / name).is_file():
            return folder / name
    raise ManifestError(f"{root / name}: not found (also looked in {root / 'devkit'}; Stanford Cars devkit file)")


def _load_mat(path: Path) -> dict:
    import scipy.io

    data = read_bytes(path)
    try:
        return scipy.io.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=True)
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
    text = read_text(path, "colour refinement: CSV of image,colour pairs")
    records = list(_numbered_rows(csv_records(text, path)))
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


def _numbered_rows(records: Iterator[tuple[int, list[str]]]) -> Iterable[tuple[int, list[str]]]:
    for line, row in records:
        if row and any(c.strip() for c in row):
            yield line, row


SOURCE = Builder("stanford-cars", stanford_cars, "Stanford Cars (domain cars)",
                 "[devkit/]cars_meta.mat, cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/, cars_test/; "
                 "or sc_train.csv (,x1,y1,x2,y2,Label,image)")

"""Google Landmarks v2: ``train.csv`` (``id,url,landmark_id``) or ``train_clean.csv`` (``landmark_id,images``);
images at ``train/a/b/c/abc....jpg``."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterable, Sequence

from featcache.manifest.builders.common import (
    Builder,
    CsvTable,
    check_column,
    check_unique,
    prefix_labels,
    single_split,
)
from featcache.manifest.schema import Rows

HEX_DIGITS = b"0123456789abcdefABCDEF"
DIGITS = b"0123456789"


def gldv2(root: str | os.PathLike, *, domain: str = "landmarks", annotations: str | None = None) -> Rows:
    """GLDv2: ``train.csv`` (``id,url,landmark_id``; the 2021 Kaggle copy has ``id,landmark_id``) or
    ``train_clean.csv`` (``landmark_id,images`` with space-separated ids); label = landmark id.

    ``annotations`` picks the file; by default train.csv, else train_clean.csv.
    """
    root = Path(root)
    if annotations is None:
        annotations = "train.csv" if (root / "train.csv").is_file() or not (root / "train_clean.csv").is_file() else "train_clean.csv"
    table = CsvTable(root / annotations, (), "GLDv2 annotations: train.csv (id,url,landmark_id) or train_clean.csv (landmark_id,images)")
    if "images" in table.header:  # train_clean.csv
        table.require(("landmark_id",))
        groups = table.column("images")
        landmarks = table.column("landmark_id")
        if not _all_digits(landmarks):
            check_column(table, "landmark_id", landmarks, _not_digits, "landmark id '{value}' is not an integer")
        split_groups = [g.split() for g in groups]
        check_column(table, "images", split_groups, lambda g: not g, "no image ids")
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
        table.require(("id", "landmark_id"))
        ids = table.column("id")
        landmarks = table.column("landmark_id")
        if not _all_image_ids(ids):
            check_column(table, "id", ids, lambda s: not _all_image_ids([s]), "image id '{value}' is not a GLDv2 id (hex digits, at least 3)")
        if not _all_digits(landmarks):
            check_column(table, "landmark_id", landmarks, _not_digits, "landmark id '{value}' is not an integer")
        check_unique(table, "id", ids)
    paths = gldv2_image_paths(ids)
    return single_split(paths, prefix_labels(domain, landmarks), domain)


def gldv2_image_paths(image_ids: Iterable[str], folder: str = "train") -> list[str]:
    """GLDv2 keeps image ``abc123...`` at ``train/a/b/c/abc123....jpg`` (its id's first three characters)."""
    return [f"{folder}/{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in image_ids]


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


SOURCE = Builder("gldv2", gldv2, "Google Landmarks v2 (domain landmarks)",
                 "train.csv (id,url,landmark_id) or train_clean.csv (landmark_id,images), train/a/b/c/abc....jpg")

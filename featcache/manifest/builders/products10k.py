"""Products-10k: ``train.csv`` (``name,class,group``) and the images under ``train/``."""

from __future__ import annotations

import os
from pathlib import Path

from featcache.manifest.builders.common import (
    Builder,
    CsvTable,
    check_column,
    check_unique,
    leaves_root,
    prefix_labels,
    single_split,
)
from featcache.manifest.schema import Rows


def products10k(root: str | os.PathLike, *, domain: str = "products") -> Rows:
    """Products-10k: ``train.csv`` (``name,class,group``), images under ``train/``; label = class."""
    root = Path(root)
    table = CsvTable(root / "train.csv", ("name", "class"), "Products-10k annotations: train.csv with columns name,class,group")
    names = [s.strip() for s in table.column("name")]
    classes = [s.strip() for s in table.column("class")]
    check_column(table, "name", names, lambda s: not s, "empty image name")
    check_column(table, "name", names, leaves_root, "image name '{value}' leaves the dataset folder; refused")
    check_column(table, "class", classes, lambda s: not s, "empty class")
    check_unique(table, "name", names)
    paths = [f"train/{n}" for n in names]
    return single_split(paths, prefix_labels(domain, classes), domain)


SOURCE = Builder("products10k", products10k, "Products-10k (domain products)", "train.csv (name,class,group), train/")

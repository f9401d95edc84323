"""Fashion200k: ``labels/{dress,jacket,pants,skirt,top}_{train,test}_detect_all.txt``, one image per line
(``path<TAB>detection score<TAB>description``), images at ``women/CATEGORY/SUBCATEGORY/PRODUCT/PRODUCT_N.jpeg``;
label = the product id (the image's folder). Or, when ROOT holds it, a list in the original code's (UniFEx)
form: ``fashion200k_train.csv`` or ``train.csv`` with columns ``img_path`` and ``img_id`` (or ``label``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from featcache.manifest.builders.common import (
    Builder,
    check_inside_root,
    parse_choices,
    path_label_csv,
    prefix_labels,
    read_text,
    single_split,
)
from featcache.manifest.schema import ManifestError, Rows

CATEGORIES = ("dress", "jacket", "pants", "skirt", "top")
UNIFEX_LISTS = ("fashion200k_train.csv", "train.csv")


def fashion200k(root: str | os.PathLike, *, domain: str = "fashion200k", partition: str | Sequence[str] | None = None) -> Rows:
    """One row per distinct image; ``partition``: train (default) and/or test (of the label files)."""
    root = Path(root)
    parts = parse_choices(partition, ("train", "test"), "partition", ("train",))
    listed = next((root / n for n in UNIFEX_LISTS if (root / n).is_file()), None)
    if not (root / "labels").is_dir() and listed is not None and parts == ["train"]:
        paths, labels = path_label_csv(listed, f"Fashion200k list: {listed.name} with columns img_path,img_id",
                                       label_columns=("img_id", "label"))
        return single_split(paths, prefix_labels(domain, labels), domain)
    paths: list[str] = []
    products: list[str] = []
    seen: set[str] = set()
    repeated = 0
    for part in parts:
        files = [root / "labels" / f"{c}_{part}_detect_all.txt" for c in CATEGORIES]
        if not any(f.is_file() for f in files):
            raise ManifestError(f"{root / 'labels'}: no *_{part}_detect_all.txt label files (Fashion200k: "
                                f"labels/{{{','.join(CATEGORIES)}}}_{part}_detect_all.txt)")
        for f in (f for f in files if f.is_file()):
            lines = read_text(f, "Fashion200k label file").splitlines()
            for number, text in enumerate(lines, start=1):
                if not text.strip():
                    continue
                image = text.split("\t", 1)[0].strip()
                where = f"{f}:{number}"
                check_inside_root(image, where)
                if image.count("/") < 1:
                    raise ManifestError(f"{where}: path '{image}' has no product folder (expected women/.../PRODUCT/PRODUCT_N.jpeg)")
                if image in seen:  # its product is its folder: a repeat says nothing new
                    repeated += 1
                    continue
                seen.add(image)
                paths.append(image)
                products.append(image.rsplit("/", 2)[-2])
    rows = single_split(paths, prefix_labels(domain, products), domain)
    if repeated:
        rows.notes.append(f"{repeated} lines repeat an image already listed: one row per image")
    return rows


SOURCE = Builder("fashion200k", fashion200k, "Fashion200k products (domain fashion200k)",
                 "labels/*_{train,test}_detect_all.txt (path, score, description), women/...; or fashion200k_train.csv")

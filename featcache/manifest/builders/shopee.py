"""Shopee product matching: ``train.csv`` (``posting_id,image,image_phash,title,label_group``; titles are
quoted and may hold commas), images in ``train_images/``; label = label_group (one product)."""

from __future__ import annotations

import os
from pathlib import Path

from featcache.manifest.builders.common import Builder, CsvTable, check_column, leaves_root, prefix_labels, single_split
from featcache.manifest.schema import Rows


def shopee(root: str | os.PathLike, *, domain: str = "shopee") -> Rows:
    """Shopee; one row per distinct image file. Postings that share an image file keep its first
    posting's label_group (counted in the notes when they disagree)."""
    root = Path(root)
    table = CsvTable(root / "train.csv", ("image", "label_group"),
                     "Shopee annotations: train.csv with columns posting_id,image,image_phash,title,label_group")
    images = [s.strip() for s in table.column("image")]
    groups = [s.strip() for s in table.column("label_group")]
    check_column(table, "image", images, lambda s: not s, "empty image name")
    check_column(table, "image", images, leaves_root, "image name '{value}' leaves the dataset folder; refused")
    check_column(table, "label_group", groups, lambda s: not s.isdigit(), "label_group '{value}' is not an integer")
    first: dict[str, str] = {}
    disagree = 0
    for image, group in zip(images, groups):
        if image not in first:
            first[image] = group
        elif first[image] != group:
            disagree += 1
    rows = single_split([f"train_images/{i}" for i in first], prefix_labels(domain, first.values()), domain)
    repeated = len(images) - len(first)
    if repeated:
        rows.notes.append(f"{repeated} postings reuse an image file of another posting: one row per file"
                          + (f" ({disagree} of them under another label_group, kept under the first)" if disagree else ""))
    return rows


SOURCE = Builder("shopee", shopee, "Shopee product matching (domain shopee)", "train.csv (posting_id,image,image_phash,title,label_group), train_images/")

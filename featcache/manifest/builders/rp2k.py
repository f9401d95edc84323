"""RP2K retail products: the release's folder per product, ``all/train/PRODUCT/*.jpg`` and
``all/test/PRODUCT/*.jpg`` (also without the ``all/`` level); or, when ROOT holds it, the ``train.csv``
(``img_path,img_id``, paths relative to ``train/``) that the original code (UniFEx) read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from featcache.manifest.builders.common import Builder, parse_choices, path_label_csv, prefix_labels, scan_class_folders, single_split
from featcache.manifest.schema import ManifestError, Rows


def rp2k(root: str | os.PathLike, *, domain: str = "rp2k", partition: str | Sequence[str] | None = None) -> Rows:
    """Label = the product (its folder name, or img_id). ``partition``: train (default) and/or test."""
    root = Path(root)
    parts = parse_choices(partition, ("train", "test"), "partition", ("train",))
    if (root / "train.csv").is_file() and parts == ["train"]:
        paths, labels = path_label_csv(root / "train.csv", "RP2K list: train.csv with columns img_path,img_id", label_columns=("img_id",))
        return single_split([f"train/{p}" for p in paths], prefix_labels(domain, labels), domain)
    paths, labels, notes = [], [], []
    for part in parts:
        base = next((b for b in ("all", "") if (root / b / part).is_dir()), None)
        if base is None:
            raise ManifestError(f"{root / 'all' / part}: folder not found (also looked for {root / part}; "
                                f"RP2K: {part}/PRODUCT/*.jpg{', or train.csv' if part == 'train' else ''})")
        folder = f"{base}/{part}" if base else part
        found, products, skipped, _ = scan_class_folders(root / folder)
        paths += [f"{folder}/{p}" for p in found]
        labels += products
        if skipped:
            notes.append(f"skipped {skipped} files in {root / folder} whose extension Pillow does not read")
    rows = single_split(paths, prefix_labels(domain, labels), domain)
    rows.notes += notes
    return rows


SOURCE = Builder("rp2k", rp2k, "RP2K retail products (domain rp2k)", "[all/]train/PRODUCT/*.jpg, [all/]test/...; or train.csv (img_path,img_id)")

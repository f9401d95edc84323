"""Stanford Online Products: ``Ebay_train.txt`` (or ``Ebay_test.txt``), space-separated
``image_id class_id super_class_id path`` after a header line; images at ``path`` under the root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from featcache.manifest.builders.common import (
    Builder,
    check_inside_root,
    parse_choices,
    prefix_labels,
    read_text,
    single_split,
)
from featcache.manifest.schema import ManifestError, Rows

SOP_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def sop(root: str | os.PathLike, *, domain: str = "sop", partition: str | Sequence[str] | None = None) -> Rows:
    """Stanford Online Products; label = class_id (one product). ``partition``: train (default) and/or test."""
    root = Path(root)
    paths: list[str] = []
    classes: list[str] = []
    seen: dict[str, str] = {}
    for part in parse_choices(partition, tuple(SOP_FILES), "partition", ("train",)):
        path = root / SOP_FILES[part]
        lines = read_text(path, f"Stanford Online Products: {SOP_FILES[part]}").splitlines()
        if not lines or lines[0].split() != SOP_HEADER:
            raise ManifestError(f"{path}:1: expected header '{' '.join(SOP_HEADER)}'")
        for number, text in enumerate(lines[1:], start=2):
            cells = text.split()
            if not cells:
                continue
            if len(cells) != 4:
                raise ManifestError(f"{path}:{number}: expected 4 fields ({' '.join(SOP_HEADER)}), found {len(cells)}")
            _, class_id, _, image = cells
            if not class_id.isdigit():
                raise ManifestError(f"{path}:{number}: class_id '{class_id}' is not an integer")
            where = f"{path}:{number}"
            check_inside_root(image, where)
            if image in seen:
                raise ManifestError(f"{where}: image '{image}' is listed twice (first at {seen[image]})")
            seen[image] = where
            paths.append(image)
            classes.append(class_id)
    return single_split(paths, prefix_labels(domain, classes), domain)


SOURCE = Builder("sop", sop, "Stanford Online Products (domain sop)", "Ebay_train.txt / Ebay_test.txt (image_id class_id super_class_id path)")

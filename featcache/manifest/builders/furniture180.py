"""Furniture 180: the list shipped with the original code (UniFEx), ``furniture180_train.csv``
(``img_path,label``, paths ``CLASS/FILE`` relative to ROOT, labels 0-179)."""

from __future__ import annotations

import os
from pathlib import Path

from featcache.manifest.builders.common import Builder, path_label_csv, prefix_labels, single_split
from featcache.manifest.schema import Rows


def furniture180(root: str | os.PathLike, *, domain: str = "furniture", annotations: str = "furniture180_train.csv") -> Rows:
    """One row per listed image; label = the list's label."""
    root = Path(root)
    paths, labels = path_label_csv(root / annotations, f"Furniture 180 list: {annotations} with columns img_path,label")
    return single_split(paths, prefix_labels(domain, labels), domain)


SOURCE = Builder("furniture180", furniture180, "Furniture 180 (domain furniture)", "furniture180_train.csv (img_path,label)")

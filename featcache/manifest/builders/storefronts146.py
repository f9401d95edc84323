"""Storefronts 146: the list shipped with the original code (UniFEx), ``storefronts146_train.csv``
(``img_path,label``, paths relative to ROOT; brand folders may hold spaces, apostrophes and nested
folders such as ``Apple Store/iTunes/``, so the label column, not the path, names the class)."""

from __future__ import annotations

import os
from pathlib import Path

from featcache.manifest.builders.common import Builder, path_label_csv, prefix_labels, single_split
from featcache.manifest.schema import Rows


def storefronts146(root: str | os.PathLike, *, domain: str = "storefronts", annotations: str = "storefronts146_train.csv") -> Rows:
    """One row per listed image; label = the list's label."""
    root = Path(root)
    paths, labels = path_label_csv(root / annotations, f"Storefronts 146 list: {annotations} with columns img_path,label")
    return single_split(paths, prefix_labels(domain, labels), domain)


SOURCE = Builder("storefronts146", storefronts146, "Storefronts 146 (domain storefronts)", "storefronts146_train.csv (img_path,label)")

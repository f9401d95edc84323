"""A folder per class: ``ROOT/CLASS/*.jpg``."""

from __future__ import annotations

import os
from pathlib import Path

from featcache.manifest.builders.common import Builder, prefix_labels, require_dir, scan_class_folders, single_split
from featcache.manifest.schema import ManifestError, Rows


def imagefolder(root: str | os.PathLike, *, domain: str | None = None) -> Rows:
    """``ROOT/CLASS/*.jpg`` (any extension Pillow reads); label = the class folder's name. ``domain``
    defaults to ROOT's own name."""
    root = Path(root)
    require_dir(root, "image folder: one subfolder per class")
    domain = domain or root.resolve().name or "images"
    paths, classes, skipped, loose = scan_class_folders(root)
    if not paths:
        raise ManifestError(f"{root}: no images in class folders (expected ROOT/CLASS/IMAGE.jpg)")
    rows = single_split(paths, prefix_labels(domain, classes), domain)
    if skipped:
        rows.notes.append(f"skipped {skipped} files whose extension Pillow does not read")
    if loose:
        rows.notes.append(f"ignored {loose} files directly in {root} (images belong in a folder per class)")
    return rows


SOURCE = Builder("imagefolder", imagefolder, "a folder per class (domain = folder name)", "CLASS/*.jpg")

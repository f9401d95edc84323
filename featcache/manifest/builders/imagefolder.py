"""A folder per class: ``ROOT/CLASS/*.jpg``."""

from __future__ import annotations

import os
from pathlib import Path

from featcache.manifest.builders.common import Builder, prefix_labels, require_dir, single_split
from featcache.manifest.schema import ManifestError, Rows


def imagefolder(root: str | os.PathLike, *, domain: str | None = None) -> Rows:
    """``ROOT/CLASS/*.jpg`` (any extension Pillow reads); label = the class folder's name. ``domain``
    defaults to ROOT's own name."""
    from PIL import Image

    root = Path(root)
    require_dir(root, "image folder: one subfolder per class")
    Image.init()
    extensions = {e.lower() for e in Image.registered_extensions()}
    domain = domain or root.resolve().name or "images"
    paths: list[str] = []
    classes: list[str] = []
    skipped = 0
    loose = 0
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            loose += 1
            continue
        for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if f.name.startswith(".") or not f.is_file():
                continue
            if os.path.splitext(f.name)[1].lower() not in extensions:
                skipped += 1
                continue
            paths.append(f"{entry.name}/{f.name}")
            classes.append(entry.name)
    if not paths:
        raise ManifestError(f"{root}: no images in class folders (expected ROOT/CLASS/IMAGE.jpg)")
    rows = single_split(paths, prefix_labels(domain, classes), domain)
    if skipped:
        rows.notes.append(f"skipped {skipped} files whose extension Pillow does not read")
    if loose:
        rows.notes.append(f"ignored {loose} files directly in {root} (images belong in a folder per class)")
    return rows


SOURCE = Builder("imagefolder", imagefolder, "a folder per class (domain = folder name)", "CLASS/*.jpg")

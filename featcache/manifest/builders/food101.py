"""Food-101: ``meta/train.json`` and ``meta/test.json`` (``{class: ["class/id", ...]}``), images at
``images/class/id.jpg``. The paper's training used the test images (``partition`` test, the default)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from featcache.manifest.builders.common import Builder, check_inside_root, parse_choices, prefix_labels, require_file, single_split
from featcache.manifest.schema import ManifestError, Rows


def food101(root: str | os.PathLike, *, domain: str = "food", partition: str | Sequence[str] | None = None) -> Rows:
    """Food-101; label = the dish class. ``partition``: test (default, as the original training) and/or train."""
    root = Path(root)
    paths: list[str] = []
    classes: list[str] = []
    for part in parse_choices(partition, ("train", "test"), "partition", ("test",)):
        path = require_file(root / "meta" / f"{part}.json", f"Food-101: meta/{part}.json")
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(table, dict):
            raise ManifestError(f"{path}: expected an object {{class: [\"class/id\", ...]}}, found {type(table).__name__}")
        for cls, items in table.items():
            if not isinstance(items, list):
                raise ManifestError(f"{path}: class '{cls}': expected a list of \"class/id\" strings")
            for k, item in enumerate(items, start=1):
                where = f"{path}: class '{cls}', entry {k}"
                if not isinstance(item, str) or not item.startswith(f"{cls}/"):
                    raise ManifestError(f"{where}: expected \"{cls}/ID\", found {json.dumps(item)[:60]}")
                paths.append(check_inside_root(f"images/{item}.jpg", where))
                classes.append(cls)
    if len(set(paths)) != len(paths):
        dup = next(p for i, p in enumerate(paths) if p in paths[:i])
        raise ManifestError(f"{root / 'meta'}: image '{dup}' is listed twice")
    return single_split(paths, prefix_labels(domain, classes), domain)


SOURCE = Builder("food101", food101, "Food-101 (domain food; test images by default)", "meta/{train,test}.json, images/CLASS/ID.jpg")

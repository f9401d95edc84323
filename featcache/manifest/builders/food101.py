"""Food-101: ``meta/train.json`` and ``meta/test.json`` (``{class: ["class/id", ...]}``), images at
``images/class/id.jpg``. The paper's training used the test images (``partition`` test, the default)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from featcache.manifest.builders.common import (
    Builder,
    check_inside_root,
    expect,
    json_kind,
    parse_choices,
    prefix_labels,
    read_json,
    single_split,
)
from featcache.manifest.schema import ManifestError, Rows


def food101(root: str | os.PathLike, *, domain: str = "food", partition: str | Sequence[str] | None = None) -> Rows:
    """Food-101; label = the dish class. ``partition``: test (default, as the original training) and/or train."""
    root = Path(root)
    paths: list[str] = []
    classes: list[str] = []
    for part in parse_choices(partition, ("train", "test"), "partition", ("test",)):
        path = root / "meta" / f"{part}.json"
        table = expect(read_json(path, f"Food-101: meta/{part}.json"), dict, str(path), 'an object {class: ["class/id", ...]}')
        for cls, items in table.items():
            expect(items, list, f"{path}: class {cls!r}", 'a list of "class/id" strings')
            for k, item in enumerate(items, start=1):
                where = f"{path}: class '{cls}', entry {k}"
                if not isinstance(item, str) or not item.startswith(f"{cls}/"):
                    raise ManifestError(f"{where}: expected \"{cls}/ID\", found {json_kind(item)}")
                paths.append(check_inside_root(f"images/{item}.jpg", where))
                classes.append(cls)
    if len(set(paths)) != len(paths):
        seen: set[str] = set()
        dup = next(p for p in paths if p in seen or seen.add(p))
        raise ManifestError(f"{root / 'meta'}: image '{dup}' is listed twice")
    return single_split(paths, prefix_labels(domain, classes), domain)


SOURCE = Builder("food101", food101, "Food-101 (domain food; test images by default)", "meta/{train,test}.json, images/CLASS/ID.jpg")

"""The Met dataset: ``ground_truth/MET_database.json``, a list of ``{"id": EXHIBIT, "path": "MET/ID/N.jpg"}``
(label = the exhibit id). The paths start at the folder that holds the ``MET/`` image tree: ROOT in the
official release, ROOT/MET in the copy that nests it (``MET/MET/ID/N.jpg``), detected from the folders
present."""

from __future__ import annotations

import os
from pathlib import Path

from featcache.manifest.builders.common import Builder, check_inside_root, expect, prefix_labels, read_json, shown, single_split
from featcache.manifest.schema import ManifestError, Rows


def met(root: str | os.PathLike, *, domain: str = "artwork") -> Rows:
    """The Met's training exhibits; one row per image, label = exhibit id."""
    root = Path(root)
    path = root / "ground_truth" / "MET_database.json"
    entries = expect(read_json(path, "The Met: ground_truth/MET_database.json"), list, str(path),
                     'a list of {"id": ..., "path": ...} entries')
    nested = (root / "MET" / "MET").is_dir()
    prefix = "MET/" if nested else ""
    paths: list[str] = []
    ids: list[str] = []
    first: dict[str, int] = {}
    for k, entry in enumerate(entries, start=1):
        where = f"{path}: entry {k}"
        if not isinstance(entry, dict) or "id" not in entry or "path" not in entry:
            raise ManifestError(f"{where}: expected {{\"id\": ..., \"path\": ...}}, found {shown(entry)}")
        exhibit, image = entry["id"], entry["path"]
        if isinstance(exhibit, bool) or not isinstance(exhibit, (int, str)) or not str(exhibit).strip():
            raise ManifestError(f"{where}: id {shown(exhibit)} is not an exhibit id")
        if not isinstance(image, str) or not image.strip():
            raise ManifestError(f"{where}: path {shown(image)} is not a file path")
        image = prefix + check_inside_root(image.strip(), where)
        if image in first:
            raise ManifestError(f"{where}: image '{image}' is listed twice (first in entry {first[image]})")
        first[image] = k
        paths.append(image)
        ids.append(str(exhibit).strip())
    rows = single_split(paths, prefix_labels(domain, ids), domain)
    if nested:
        rows.notes.append("images found under MET/MET/ (the nested copy): paths start with MET/MET/")
    return rows


SOURCE = Builder("met", met, "The Met exhibits (domain artwork)", "ground_truth/MET_database.json, MET/ID/N.jpg")

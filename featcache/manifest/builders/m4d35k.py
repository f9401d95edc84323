"""M4D-35k as published: ``m4d-35k_train.csv`` at the data root, columns ``img_path,label``, paths
relative to that root (``products-10k/train/...``, ``google_landmark_recognition_2021/train/...``,
``deepfashion/...``, ``stanford_cars/...``); labels are one class space across the four sources. The
paper's exact training set, its fixed GLDv2 subset included, in one command."""

from __future__ import annotations

import os
from pathlib import Path

from featcache.manifest.builders.common import Builder, path_label_csv
from featcache.manifest.schema import DEFAULT_SPLIT, Rows

# The first path component names the source; its domain, as the other builders name it.
DOMAINS = {"products-10k": "products", "products10k": "products", "google_landmark_recognition_2021": "landmarks",
           "gldv2": "landmarks", "deepfashion": "apparel", "stanford_cars": "cars", "stanford-cars": "cars"}


def m4d35k(root: str | os.PathLike, *, annotations: str = "m4d-35k_train.csv") -> Rows:
    """The published list; domain from each path's first component, label = ``m4d/<label>`` (one space)."""
    root = Path(root)
    paths, labels = path_label_csv(root / annotations, f"M4D-35k list: {annotations} with columns img_path,label",
                                   root_name="data root")
    domains = [DOMAINS.get(p.split("/", 1)[0], p.split("/", 1)[0]) for p in paths]
    full = {lab: f"m4d/{lab}" for lab in dict.fromkeys(labels)}
    return Rows(paths, [full[lab] for lab in labels], domains, [DEFAULT_SPLIT] * len(paths))


SOURCE = Builder("m4d-35k", m4d35k, "M4D-35k, the paper's published training list (4 domains)", "m4d-35k_train.csv (img_path,label) at the data root")

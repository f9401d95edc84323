"""DeepFashion2: one JSON per image, ``PARTITION/annos/NNNNNN.json``, beside ``PARTITION/image/NNNNNN.jpg``
(PARTITION: train, validation). Each holds ``source`` (shop or user), ``pair_id`` and items ``item1``,
``item2``, ... with ``style`` and ``bounding_box`` [x1, y1, x2, y2] in pixels. Items of one pair with the
same style > 0 are one garment; style 0 items have no match and are left out. One row per item, its box as
the crop (crops happen at extract time, no cropped copies on disk)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from featcache.manifest.builders.common import (
    Builder,
    as_int,
    check_box,
    list_dir,
    parse_choices,
    prefix_labels,
    read_json,
    require_dir,
    shown,
)
from featcache.manifest.schema import DEFAULT_SPLIT, ManifestError, Rows

PARTITIONS = ("train", "validation")
ITEM_KEY = re.compile(r"item[0-9]{1,6}")


def deepfashion2(root: str | os.PathLike, *, domain: str = "deepfashion2", partition: str | Sequence[str] | None = None) -> Rows:
    """Label = ``PAIR_STYLE`` (``validation/PAIR_STYLE`` in validation: pair ids restart in each
    partition). ``partition``: train (default) and/or validation; in validation, user photos are queries
    and shop photos the index (the benchmark's consumer-to-shop protocol)."""
    root = Path(root)
    paths: list[str] = []
    labels: list[str] = []
    splits: list[str] = []
    boxes: list[list[float]] = []
    unmatched = 0
    for part in parse_choices(partition, PARTITIONS, "partition", ("train",)):
        annos = require_dir(root / part / "annos", f"DeepFashion2: {part}/annos/*.json")
        for name in (e.name for e in list_dir(annos) if e.name.endswith(".json")):
            f = annos / name
            record = read_json(f, "DeepFashion2 annotation")
            if not isinstance(record, dict) or "pair_id" not in record or "source" not in record:
                raise ManifestError(f"{f}: expected an object with source, pair_id and item1, item2, ...")
            if record["source"] not in ("shop", "user"):
                raise ManifestError(f"{f}: source must be shop or user, found {shown(record['source'])}")
            pair = record["pair_id"]
            if isinstance(pair, bool) or not isinstance(pair, (int, str)) or as_int(str(pair)) is None:
                raise ManifestError(f"{f}: pair_id must be an integer, found {shown(pair)}")
            items = sorted((k for k in record if ITEM_KEY.fullmatch(k)), key=lambda k: int(k[4:]))
            for key in items:
                item = record[key]
                style = item.get("style") if isinstance(item, dict) else None
                if isinstance(style, bool) or not isinstance(style, int) or style < 0:
                    raise ManifestError(f"{f}: {key}: style {style!r} is not a number >= 0")
                if style == 0:
                    unmatched += 1
                    continue
                box = check_box(item.get("bounding_box"), f"{f}: {key}: bounding_box")
                paths.append(f"{part}/image/{name[:-5]}.jpg")
                labels.append(f"{record['pair_id']}_{style}" if part == "train" else f"{part}/{record['pair_id']}_{style}")
                splits.append(DEFAULT_SPLIT if part == "train" else ("query" if record["source"] == "user" else "index"))
                boxes.append([float(v) for v in box])
    if not paths:
        raise ManifestError(f"{root}: DeepFashion2 found no items with a style > 0")
    rows = Rows(paths, prefix_labels(domain, labels), [domain] * len(paths), splits, np.asarray(boxes, dtype=np.float64))
    if unmatched:
        rows.notes.append(f"{unmatched} items with style 0 (no matching garment) were left out")
    return rows


SOURCE = Builder("deepfashion2", deepfashion2, "DeepFashion2 garments, one row per item box (domain deepfashion2)",
                 "{train,validation}/annos/*.json, {train,validation}/image/*.jpg")

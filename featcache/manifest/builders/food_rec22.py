"""Food Recognition 2022 (AIcrowd): COCO-style ``annotations.json`` (``images``: id, file_name;
``annotations``: image_id, category_id, bbox [x, y, width, height]; ``categories``: id, name) beside
``images/``, in the release folder (``public_training_set_release_2.0`` or the validation set). One row
per annotated item, its box as the crop (x1,y1,x2,y2), label = its category id: the crops happen at
extract time instead of in a pass that writes cropped copies."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featcache.manifest.builders.common import Builder, check_box, check_inside_root, prefix_labels, read_json, shown, single_split
from featcache.manifest.schema import ManifestError, Rows


def food_rec22(root: str | os.PathLike, *, domain: str = "food-rec22", annotations: str = "annotations.json") -> Rows:
    """One row per annotation; two items of one image are two rows (two crops of one file)."""
    root = Path(root)
    path = root / annotations
    coco = read_json(path, "Food Recognition 2022: annotations.json (COCO format)")
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations", "categories")):
        raise ManifestError(f"{path}: expected a COCO object with lists images, annotations and categories")
    files: dict[object, str] = {}
    for k, image in enumerate(coco["images"]):
        where = f"{path}: images[{k}]"
        if not isinstance(image, dict) or not _is_id(image.get("id")) or not isinstance(image.get("file_name"), str):
            raise ManifestError(f"{where}: expected {{\"id\": NUMBER, \"file_name\": ...}}")
        if image["id"] in files:
            raise ManifestError(f"{where}: id {shown(image['id'])} is used by another image too")
        if not image["file_name"].strip():
            raise ManifestError(f"{where}: empty file_name")
        files[image["id"]] = check_inside_root(f"images/{image['file_name']}", where)
    categories = {c.get("id") for c in coco["categories"] if isinstance(c, dict) and _is_id(c.get("id"))}
    paths: list[str] = []
    labels: list[str] = []
    boxes: list[list[float]] = []
    seen: dict[tuple, int] = {}
    for k, ann in enumerate(coco["annotations"]):
        where = f"{path}: annotations[{k}]"
        if not isinstance(ann, dict):
            raise ManifestError(f"{where}: expected an object")
        if not _is_id(ann.get("image_id")) or ann["image_id"] not in files:
            raise ManifestError(f"{where}: image_id {shown(ann.get('image_id'))} is not in images")
        if not _is_id(ann.get("category_id")) or ann["category_id"] not in categories:
            raise ManifestError(f"{where}: category_id {shown(ann.get('category_id'))} is not in categories")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_is_number, bbox)):
            raise ManifestError(f"{where}: bbox {shown(bbox)} is not [x, y, width, height] numbers")
        x, y, w, h = bbox
        # COCO's [x, y, width, height] -> x1, y1, x2, y2, clipped at the image's top-left corner
        box = check_box([max(0.0, x), max(0.0, y), x + w, y + h], f"{where}: bbox {shown(bbox)}")
        ident = (files[ann["image_id"]], *box)
        if ident in seen:  # the same item annotated twice: one crop
            continue
        seen[ident] = k
        paths.append(files[ann["image_id"]])
        labels.append(str(ann["category_id"]))
        boxes.append(box)
    rows = single_split(paths, prefix_labels(domain, labels), domain, np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    if len(paths) < len(coco["annotations"]):
        rows.notes.append(f"{len(coco['annotations']) - len(paths)} annotations repeat another's image and box: one row each")
    return rows


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


SOURCE = Builder("food-rec22", food_rec22, "Food Recognition 2022, one row per annotated item box (domain food-rec22)",
                 "annotations.json (COCO: images, annotations with bbox, categories), images/")

"""DeepFashion consumer-to-shop, in either layout it circulates in (detected from the files present):
the original ``Eval/list_eval_partition.txt`` with images under ``img/``, or the Kaggle copy's
``deepfashion_train.json`` (``{GROUP: {ITEM_ID: ["train/.../ITEM_ID/IMAGE.jpg", ...]}}``, paths relative
to ROOT) that the original code (UniFEx) read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from featcache.manifest.builders.common import (
    Builder,
    check_inside_root,
    expect,
    parse_choices,
    prefix_labels,
    read_json,
    read_text,
    single_split,
)
from featcache.manifest.schema import ManifestError, Rows

DEEPFASHION_STATUSES = ("train", "val", "test")


def deepfashion_c2s(root: str | os.PathLike, *, domain: str = "apparel", partition: str | Sequence[str] | None = None) -> Rows:
    """DeepFashion consumer-to-shop: ``Eval/list_eval_partition.txt`` lists (consumer, shop, item id,
    status) pairs; one row per distinct image, label = item id.

    ``partition`` picks the statuses (train, val, test; default train). Rows of train pairs get split
    ``train``; in val and test pairs the consumer photo is a ``query`` and the shop photo ``index``,
    the benchmark's own retrieval protocol. (The dataset spells consumer "comsumer" in its paths.)
    """
    root = Path(root)
    statuses = set(parse_choices(partition, DEEPFASHION_STATUSES, "partition", ("train",)))
    if not (root / "Eval" / "list_eval_partition.txt").is_file() and (root / KAGGLE_JSON).is_file():
        if statuses != {"train"}:
            raise ManifestError(f"{root / KAGGLE_JSON}: this copy holds the train pairs only; --partition "
                                f"{','.join(sorted(statuses))} needs the original Eval/list_eval_partition.txt")
        return _kaggle_json(root / KAGGLE_JSON, domain)
    path = root / "Eval" / "list_eval_partition.txt"
    lines = read_text(path, "DeepFashion consumer-to-shop: Eval/list_eval_partition.txt").splitlines()
    if len(lines) < 2:
        raise ManifestError(f"{path}: too short (expected a count line, a header line, then one line per pair)")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise ManifestError(f"{path}:1: expected the number of pairs, found '{lines[0].strip()}'") from None
    header = lines[1].split()
    if header != ["image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status"]:
        raise ManifestError(f"{path}:2: expected header 'image_pair_name_1 image_pair_name_2 item_id evaluation_status', found '{lines[1].strip()}'")
    where: dict[str, tuple[int, str, str]] = {}  # path -> (line, label, split)
    pairs = 0
    for number, text in enumerate(lines[2:], start=3):
        cells = text.split()
        if not cells:
            continue
        pairs += 1
        if len(cells) != 4:
            raise ManifestError(f"{path}:{number}: expected 4 fields (consumer shop item_id status), found {len(cells)}")
        consumer, shop, item, status = cells
        if status not in DEEPFASHION_STATUSES:
            raise ManifestError(f"{path}:{number}: unknown evaluation_status '{status}' (expected train, val or test)")
        if status not in statuses:
            continue
        for image, split in ((consumer, "query"), (shop, "index")):
            check_inside_root(image, f"{path}:{number}")
            split = "train" if status == "train" else split
            if image in where:
                first, label0, split0 = where[image]
                if label0 != item:
                    raise ManifestError(f"{path}:{number}: image '{image}' has item id {item} here but {label0} on line {first}")
                if split0 != split:
                    raise ManifestError(f"{path}:{number}: image '{image}' is a {split} image here but a {split0} image on line {first}")
                continue
            where[image] = (number, item, split)
    if pairs != declared:
        raise ManifestError(f"{path}:1: the file says {declared} pairs but lists {pairs} (truncated or edited?)")
    if not where:
        raise ManifestError(f"{path}: no pairs with evaluation_status {', '.join(sorted(statuses))}")
    paths = list(where)
    labels = prefix_labels(domain, (where[p][1] for p in paths))
    return Rows(paths, labels, [domain] * len(paths), [where[p][2] for p in paths])


KAGGLE_JSON = "deepfashion_train.json"


def _kaggle_json(path: Path, domain: str) -> Rows:
    """The Kaggle copy: {group: {item id: [image paths]}}; one row per image, label = item id."""
    groups = expect(read_json(path, "DeepFashion consumer-to-shop (Kaggle copy)"), dict, str(path),
                    "an object {GROUP: {ITEM_ID: [paths]}}")
    item_of: dict[str, str] = {}
    for group, items in groups.items():
        expect(items, dict, f"{path}: group {group!r}", "an object {ITEM_ID: [paths]}")
        for item, images in items.items():
            where = f"{path}: group {group!r}, item {item!r}"
            if not isinstance(images, list) or not all(isinstance(i, str) and i.strip() for i in images):
                raise ManifestError(f"{where}: expected a list of image paths")
            for image in images:
                image = check_inside_root(image.strip(), where)
                if item_of.get(image, item) != item:
                    raise ManifestError(f"{where}: image '{image}' is also listed under item '{item_of[image]}'")
                item_of[image] = item
    return single_split(list(item_of), prefix_labels(domain, item_of.values()), domain)


SOURCE = Builder("deepfashion-c2s", deepfashion_c2s, "DeepFashion consumer-to-shop (domain apparel)",
                 "Eval/list_eval_partition.txt, img/; or deepfashion_train.json (Kaggle copy)")

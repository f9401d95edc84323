"""ILIAS (Kordopatis-Zilos et al., CVPR 2025, "ILIAS: Instance-Level Image retrieval At Scale"): the release's id
lists ``image_ids/image_query_ids.txt`` and ``image_ids/positive_ids.txt`` over the images of ``ilias_core/``."""

from __future__ import annotations

import os
from pathlib import Path

from featcache.manifest.builders.common import Builder, check_inside_root, read_text, require_dir
from featcache.manifest.schema import ManifestError, Rows

ILIAS_DATA_URL = "https://vrg.fel.cvut.cz/ilias_data/"


def ilias(root: str | os.PathLike, *, domain: str | None = None) -> Rows:
    """ILIAS's image queries (split ``query``) and their positives (split ``index``), one class per object
    instance.

    ``root`` is the dataset folder as the release's download script leaves it: ``ilias_core/`` (one folder
    per instance, ``<instance>/query/QNNN_YY.jpg`` and ``<instance>/pos/PNNN_ZZ.jpg``) and ``image_ids/``
    with ``image_query_ids.txt`` (the first comma-separated field of each line is a query's id) and
    ``positive_ids.txt`` (``id,scale,clutter``). An id is the image's path inside ``ilias_core/``, and its
    first folder is the instance, which is the label (``ilias/bold_bimp_000``): a positive is relevant to
    the queries of its instance. Manifest paths are ``ilias_core/<id>``. Queries are whole images (the
    release's evaluation does not crop them to their boxes). Text queries are not image queries and are left
    out. The 100M YFCC distractors are WebDataset shards: list them with ``manifest build webdataset``,
    extract them, and give the caches to ``eval --distractors``.
    """
    root = Path(root)
    require_dir(root, f"ILIAS data; download it from {ILIAS_DATA_URL}")
    ids = root / "image_ids"
    require_dir(ids, f"ILIAS id lists (image_ids/); download them from {ILIAS_DATA_URL}")
    domain = domain or "ilias"
    parts, seen = [], {}
    for name, split in (("image_query_ids.txt", "query"), ("positive_ids.txt", "index")):
        path = ids / name
        paths, labels = [], []
        for line_no, line in enumerate(read_text(path, f"ILIAS {split} ids").splitlines(), start=1):
            image_id = line.split(",", 1)[0].strip()
            if not image_id or (line_no == 1 and image_id == "id"):  # blank lines, a header
                continue
            where = f"{path}:{line_no}"
            check_inside_root(image_id, where)
            instance = image_id.split("/", 1)[0]
            if "/" not in image_id or not instance:
                raise ManifestError(f"{where}: '{image_id}' is not an image id of the form INSTANCE/query|pos/FILE")
            if image_id in seen:
                raise ManifestError(f"{where}: image '{image_id}' is also listed at {seen[image_id]}")
            seen[image_id] = where
            paths.append(f"ilias_core/{image_id}")
            labels.append(f"{domain}/{instance}")
        if not paths:
            raise ManifestError(f"{path}: lists no images")
        parts.append(Rows(paths, labels, [domain] * len(paths), [split] * len(paths)))
    queries, positives = parts
    lonely = sorted(set(queries.labels) - set(positives.labels))
    if lonely:
        raise ManifestError(f"{ids / 'positive_ids.txt'}: no positive image for {len(lonely)} queried instance(s), "
                            f"e.g. {lonely[0]}: the id lists do not belong together")
    return Rows.concat(parts)


SOURCE = Builder(
    "ilias", ilias,
    "ILIAS (CVPR 2025): 1,232 image queries and 4,715 positives of 1,000 object instances; distractors "
    "through the webdataset source",
    "image_ids/image_query_ids.txt, image_ids/positive_ids.txt, ilias_core/<instance>/{query,pos}/*.jpg",
)

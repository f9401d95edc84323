"""UnED (Ypsilantis et al., ICCV 2023): the benchmark's split files ``info_files/<domain>/<split>.json``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from featcache.manifest.builders.common import (
    Builder,
    as_int,
    check_inside_root,
    expect,
    parse_choices,
    read_json,
    require_dir,
    shown,
)
from featcache.manifest.schema import ManifestError, Rows

UNED_DOMAINS = ("cars", "sop", "inshop", "inat", "met", "gldv2", "food2k", "rp2k")
UNED_PARTITIONS = ("train", "val", "test")
# Which split files are the queries and the index of each domain's kNN evaluation, as in the
# benchmark's universal_embedding/dataset_infos.py ('knn' -> 'val_knn' / 'test_knn'). None: the
# queries are their own index (each query searches the others, itself excluded).
UNED_KNN = {
    "val": {d: ("val", "small_index" if d == "met" else None) for d in UNED_DOMAINS},
    "test": {d: ("test", "index" if d in ("inshop", "met", "gldv2") else None) for d in UNED_DOMAINS},
}
UNED_INFO_URL = "https://cmp.felk.cvut.cz/univ_emb/info_files.zip"


def uned(
    root: str | os.PathLike,
    *,
    domain: str | Sequence[str] | None = None,
    partition: str | None = None,
    info_dir: str | os.PathLike | None = None,
) -> Rows:
    """UnED: the benchmark's published split files ``info_files/<domain>/<split>.json``, each a JSON
    list of ``{"path": ..., "class_id": ...}`` with paths relative to the ``images/`` folder.

    ``root`` is the UnED data folder holding ``images/`` and (unless ``info_dir`` says otherwise)
    ``info_files/``; manifest paths are ``images/<path>``. ``partition`` is ``test`` (default: the
    benchmark's queries and index), ``val``, or ``train`` (the 2.8M training images, split ``train``).
    In test/val the query files become split ``query`` and the index files split ``index``; domains
    whose queries are their own index (cars, sop, inat, food2k, rp2k) have only ``query`` rows, each
    to be searched against the others. ``domain`` picks UnED domains (default all 8); each is both the
    manifest domain and the label prefix (``cars/17``). A query with several class ids (a JSON list)
    gets them joined with ``|`` (``gldv2/12|gldv2/40``): relevant when any one matches.
    """
    root = Path(root)
    domains = parse_choices(domain, UNED_DOMAINS, "domain", UNED_DOMAINS)
    part = parse_choices(partition, UNED_PARTITIONS, "partition", ("test",))
    if len(part) != 1:
        raise ManifestError("--partition: UnED takes one of train, val, test")
    part = part[0]
    info = Path(info_dir) if info_dir is not None else root / "info_files"
    require_dir(info, f"UnED split files; download and unzip {UNED_INFO_URL} into {root}")
    images = root / "images"
    parts: list[Rows] = []
    seen: dict[str, Path] = {}
    for d in domains:
        files = [("train", "train")] if part == "train" else [(UNED_KNN[part][d][0], "query")]
        if part != "train" and UNED_KNN[part][d][1]:
            files.append((UNED_KNN[part][d][1], "index"))
        for stem, split in files:
            path = info / d / f"{stem}.json"
            rel, labels = _uned_split_file(path, d)
            if d == "rp2k" and images.is_dir():
                rel = [_rp2k_on_disk(images, p) for p in rel]
            paths = [f"images/{p}" for p in rel]
            for p in paths:
                if p in seen:
                    raise ManifestError(f"{path}: image '{p}' is also listed in {seen[p]}")
                seen[p] = path
            parts.append(Rows(paths, labels, [d] * len(paths), [split] * len(paths)))
    rows = Rows.concat(parts)
    if not len(rows):
        raise ManifestError(f"{info}: the UnED split files list no images")
    return rows


def _uned_split_file(path: Path, domain: str) -> tuple[list[str], list[str]]:
    entries = expect(read_json(path, f"UnED split file; download and unzip {UNED_INFO_URL}"), list, str(path),
                     'a JSON list of {"path", "class_id"} objects')
    paths: list[str] = []
    labels: list[str] = []
    prefix = f"{domain}/"
    for k, e in enumerate(entries, start=1):
        where = f"{path}: entry {k}"
        if not isinstance(e, dict) or "path" not in e or "class_id" not in e:
            raise ManifestError(f"{where}: expected an object with keys 'path' and 'class_id', found {shown(e)}")
        p, cid = e["path"], e["class_id"]
        if not isinstance(p, str) or not p.strip():
            raise ManifestError(f"{where}: 'path' must be a non-empty string")
        check_inside_root(p, where)
        ids = [_class_id(c) for c in (cid if isinstance(cid, list) else [cid])]
        if not ids or None in ids:
            raise ManifestError(f"{where}: 'class_id' must be an integer or a list of integers, found {shown(cid)}")
        paths.append(p)
        labels.append("|".join(prefix + str(c) for c in ids))
    return paths, labels


def _class_id(c) -> int | None:
    """A class id written as a JSON integer or a string of digits; None for anything else."""
    if isinstance(c, bool):
        return None
    return c if isinstance(c, int) else as_int(c) if isinstance(c, str) else None


def _rp2k_escape(path: str) -> str:
    """RP2K's file names as they come out of its zip on some systems: non-ASCII characters written as
    ``#Uxxxx`` (what the benchmark's own loader falls back to)."""
    out = []
    for ch in path:
        o = ord(ch)
        out.append(ch if o < 128 else f"#U{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
    return "".join(out)


def _rp2k_on_disk(images: Path, path: str) -> str:
    if path.isascii() or (images / path).exists():
        return path
    escaped = _rp2k_escape(path)
    return escaped if (images / escaped).exists() else path


SOURCE = Builder("uned", uned, "UnED benchmark splits (8 domains)", "info_files/<domain>/{train,val,test,index}.json, images/")

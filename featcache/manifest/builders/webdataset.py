"""WebDataset shards (img2dataset's output): one manifest row per sample, named ``SHARD#KEY``.

Reads, under ROOT, the shards ``--shards`` names (a brace pattern such as ``{00000..00999}.tar``, relative
to ROOT; default every ``*.tar`` in ROOT), and for each shard either
- img2dataset's parquet beside it (``00000.parquet``: columns ``key``, ``status`` and the label column),
  when it has the ``--label`` column: no tar is opened, only rows with ``status == "success"`` (the ones
  in the tar) are listed; or
- the tar itself, front to back: a sample is the members sharing a key; its image is its first member
  with an image field (``jpg``, ``png``, ``webp``, ...), its label the ``--label`` field: ``cls`` or ``txt``
  (the member's text), or any other name, read as a key of the sample's ``json``; ``__key__`` makes each
  sample its own class (distractors, whose labels never count).
Samples without an image, or without a label, are left out, counted and named in the notes.
Label = ``DOMAIN/value``; the domain defaults to ROOT's own name.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from featcache.storage import location
from featcache.manifest.builders.common import Builder, check_inside_root, prefix_labels, require_dir, single_split
from featcache.manifest.schema import ManifestError, Rows
from featcache.manifest.webdataset import IMAGE_FIELDS, expand_braces, sample_path, split_member

TEXT_FIELDS = ("cls", "txt")
KEY_LABEL = "__key__"  # --label __key__: each sample is its own class (distractors, whose labels never matter)


def webdataset(root: str | os.PathLike, *, shards: str | None = None, label: str | None = None,
               domain: str | None = None) -> Rows:
    """One row per sample of the shards; see the module docstring."""
    root = location(root)  # a local folder, or a URL on an object store
    require_dir(root, "WebDataset shards")
    if not label:
        raise ManifestError("webdataset: say where each sample's label is with --label (cls, txt, or a key of its json)")
    domain = domain or root.resolve().name or "webdataset"
    names = _shard_names(root, shards)
    paths, labels, without_image, without_label, not_fetched = [], [], [], [], []
    for name in names:
        check_inside_root(name, f"--shards {shards}")
        found = _from_parquet(root, name, label, not_fetched)
        if found is None:
            found = _from_tar(root, name, label)
        for key, value, has_image in found:
            text = label_text(value)
            if not has_image:
                without_image.append(f"{name}#{key}")
            elif text is None:
                without_label.append(f"{name}#{key}")
            else:
                paths.append(sample_path(name, key))
                labels.append(text)
    if not paths:
        raise ManifestError(f"{root}: no samples with an image and a {label!r} label in {len(names)} shard(s)")
    rows = single_split(paths, prefix_labels(domain, labels), domain)
    for what, keys in (("an image", without_image), (f"a {label!r} label", without_label),
                       ("an image (img2dataset did not fetch them)", not_fetched)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5:,} more" if len(keys) > 5 else "")
            rows.notes.append(f"left out {len(keys):,} samples without {what}: {shown}")
    return rows


def _shard_names(root: Path, pattern: str | None) -> list[str]:
    if pattern is None:
        names = sorted(p.name for p in root.iterdir() if p.name.endswith(".tar") and p.is_file())
        if not names:
            raise ManifestError(f"{root}: no *.tar shards (name them with --shards '{{00000..00099}}.tar')")
        return names
    try:
        names = expand_braces(pattern)
    except ValueError as e:
        raise ManifestError(str(e)) from None
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise ManifestError(f"{root / missing[0]}: shard not found" + (f" (and {len(missing) - 1:,} more of --shards {pattern})"
                                                                       if len(missing) > 1 else ""))
    bad = next((n for n in names if not n.endswith(".tar")), None)
    if bad:
        raise ManifestError(f"--shards {pattern}: {bad} is not a .tar shard")
    return names


def label_text(value) -> str | None:
    """A label value from JSON or parquet as the class name: whole numbers without ``.0`` (a parquet column
    with nulls holds 3.0 where the JSON holds 3), booleans as ``true``/``false``; None, NaN and blank text:
    no label."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _from_parquet(root: Path, name: str, label: str, not_fetched: list[str]) -> list[tuple[str, object, bool]] | None:
    """(key, label, True) per successful sample from img2dataset's parquet beside the shard; None when there
    is no such parquet, or it has no ``label`` column (the tar is read then). Rows img2dataset did not fetch
    (``status`` other than ``success``) go to ``not_fetched``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table_file = root / (name[: -len(".tar")] + ".parquet")
    if not table_file.is_file():
        return None
    column = "key" if label == KEY_LABEL else label
    try:
        with table_file.open("rb") as f:
            schema = pq.read_schema(f)
            if column not in schema.names or "key" not in schema.names:
                return None
            f.seek(0)
            table = pq.read_table(f, columns=list(dict.fromkeys(["key", column] + (["status"] if "status" in schema.names else []))))
    except (OSError, pa.ArrowException) as e:
        raise ManifestError(f"{table_file}: not a readable parquet file ({type(e).__name__}: {first_line(e)})") from None
    if not pa.types.is_string(schema.field("key").type) and not pa.types.is_large_string(schema.field("key").type):
        raise ManifestError(f"{table_file}: key holds {schema.field('key').type}, expected text (the members' names, "
                            "e.g. 000010003, as img2dataset writes them)")
    data = table.to_pydict()
    status = data.get("status") or ["success"] * table.num_rows
    found = []
    for k, v, s in zip(data["key"], data[column], status):
        if k is None:
            continue
        if s == "success":
            found.append((k, v, True))
        else:
            not_fetched.append(f"{name}#{k}")
    return found


def _from_tar(root: Path, name: str, label: str) -> list[tuple[str, object, bool]]:
    """(key, label or None, has an image) per sample of one shard, in the shard's order."""
    samples: dict[str, dict] = {}
    try:
        with (root / name).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:  # a stream: front to back, once
            for member in tar:
                if not member.isfile():
                    continue
                key, field = split_member(member.name)
                sample = samples.setdefault(key, {"image": False, "label": key if label == KEY_LABEL else None})
                if field in IMAGE_FIELDS:
                    sample["image"] = True
                elif (field in TEXT_FIELDS and field == label) or (field == "json" and label not in (*TEXT_FIELDS, KEY_LABEL)):
                    data = tar.extractfile(member).read()
                    sample["label"] = _label_of(data, field, label, f"{root / name}: {member.name}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ManifestError(f"{root / name}: not a readable tar shard ({type(e).__name__}: {first_line(e)})") from None
    return [(key, s["label"], s["image"]) for key, s in samples.items()]


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _label_of(data: bytes, field: str, label: str, where: str):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{where}: not UTF-8 text") from None
    if field != "json":
        return text
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{where}: not JSON ({type(e).__name__})") from None
    value = record.get(label) if isinstance(record, dict) else None
    return None if isinstance(value, (dict, list)) else value


SOURCE = Builder("webdataset", webdataset, "WebDataset tar shards, e.g. img2dataset's (domain = folder name)",
                 "{00000..N}.tar (+ .parquet)")

"""The feature cache: a Zarr v3 group written once per (manifest, backbone, preprocessing, dtype).

Layout (see DESIGN.md, "Feature cache contract"):

- ``features`` (N, D) float16/float32, raw backbone output; chunks are whole rows, uncompressed.
- ``valid`` (N,) bool and ``failures`` (N,) str, chunked like ``features`` rows.
- ``labels`` (N,) int64 into ``classes``; ``paths``, ``domains``, ``splits`` (N,) str; ``classes`` (C,) str.
- ``chunk_done`` (n_chunks,) bool, one file per flag: chunk k is done once its flag is set.
- attrs ``featcache``: provenance and the cache ``key``.

The store is created whole by one coordinator (atomically, via a temporary folder and a rename);
workers then own disjoint whole chunks and never resize or re-create anything.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from featcache import __version__
from featcache.manifest import Manifest

FORMAT_VERSION = 1
ATTRS = "featcache"
TARGET_CHUNK_BYTES = 4 << 20
# What changes the numbers, and so the key. Everything else in the attrs is provenance.
KEY_FIELDS = ("format_version", "manifest_sha256", "backbone", "preprocessing", "dtype", "precision")


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message names the store and what is wrong."""


def safe_name(text: str) -> str:
    """A model name as a file name: ``open_clip:ViT-B-32@openai`` -> ``open_clip-ViT-B-32@openai``."""
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", text).strip("-")


def default_rows_per_chunk(dim: int, dtype: str) -> int:
    """A power of two giving chunks of about 4 MB (2,048 rows for 1152-d float16)."""
    row_bytes = dim * np.dtype(dtype).itemsize
    return max(1, 2 ** round(math.log2(max(1, TARGET_CHUNK_BYTES / row_bytes))))


def file_sha256(path: str | os.PathLike, block: int = 1 << 24) -> str:
    """The sha256 of a file's bytes (weights and imported arrays are recorded by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def cache_key(meta: dict[str, Any]) -> str:
    payload = {k: meta[k] for k in KEY_FIELDS}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def key_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two caches' key fields."""
    out = []
    for k in KEY_FIELDS:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub) and sub != "name":
                    out.append(f"{k}.{sub}: {a.get(sub)!r} in the store, {b.get(sub)!r} requested")
        else:
            out.append(f"{k}: {a!r} in the store, {b!r} requested")
    return out or ["the cache key"]


def feature_space(meta: dict[str, Any]) -> dict[str, Any]:
    """What makes two caches' features comparable: the backbone (weights included) and preprocessing."""
    backbone = {k: v for k, v in meta["backbone"].items() if k != "name"}
    return {"backbone": backbone, "preprocessing": meta["preprocessing"], "precision": meta.get("precision")}


def build_meta(manifest: Manifest, backbone: dict[str, Any], preprocessing: dict[str, Any], dtype: str,
               precision: str, rows_per_chunk: int) -> dict[str, Any]:
    meta = {
        "format_version": FORMAT_VERSION,
        "manifest_sha256": manifest.content_sha256(),
        "backbone": backbone,
        "preprocessing": preprocessing,
        "dtype": dtype,
        "precision": precision,
        "manifest": str(manifest.source),
        "root": str(manifest.root),
        "rows": len(manifest),
        "dim": backbone["dim"],
        "classes": len(manifest.classes),
        "rows_per_chunk": rows_per_chunk,
        "created": _now(),
        "featcache_version": __version__,
        "complete": False,
    }
    meta["key"] = cache_key(meta)
    return meta


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def create_store(path: str | os.PathLike, manifest: Manifest, meta: dict[str, Any]) -> None:
    """Create the whole store at full size, atomically: it appears under ``path`` complete or not at all."""
    path = Path(path)
    n, dim, rows = len(manifest), meta["dim"], meta["rows_per_chunk"]
    tmp = path.with_name(path.name + ".creating")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
    root.create_array("features", shape=(n, dim), chunks=(rows, dim), dtype=meta["dtype"], fill_value=0,
                      compressors=None, config={"write_empty_chunks": True})
    root.create_array("valid", shape=(n,), chunks=(rows,), dtype=bool, fill_value=False, compressors=None,
                      config={"write_empty_chunks": True})
    root.create_array("failures", shape=(n,), chunks=(rows,), dtype=str, fill_value="")
    root.create_array("chunk_done", shape=(math.ceil(n / rows),), chunks=(1,), dtype=bool, fill_value=False,
                      compressors=None)
    _write_rows(root, manifest)
    root.attrs[ATTRS] = meta
    install(tmp, path)


def install(tmp: Path, path: Path) -> None:
    """Move a finished store into place; an existing one is replaced only once the new one is whole."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(path.name + ".replaced")
    if old.exists():
        shutil.rmtree(old)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)


def _write_rows(root: zarr.Group, manifest: Manifest) -> None:
    """The row-aligned metadata arrays, written once at creation."""
    n = len(manifest)
    meta_chunk = min(n, 1 << 16)
    root.create_array("labels", data=manifest.label_ids, chunks=(meta_chunk,))
    _string_array(root, "classes", manifest.classes, max(1, len(manifest.classes)))
    for name, values in (("paths", manifest.paths), ("domains", manifest.domains), ("splits", manifest.splits)):
        _string_array(root, name, values, meta_chunk)


def _string_array(root: zarr.Group, name: str, values: list[str], chunk: int) -> None:
    arr = root.create_array(name, shape=(len(values),), chunks=(chunk,), dtype=str, fill_value="")
    arr[:] = np.array(values, dtype=object)


def remove_partial_files(path: str | os.PathLike) -> int:
    """Delete ``*.partial`` chunk files a killed writer left behind; returns how many."""
    count = 0
    for p in Path(path).rglob("*.partial"):
        p.unlink(missing_ok=True)
        count += 1
    return count


def fsync_chunk_files(store: Path, k: int) -> None:
    """Flush chunk k of the row arrays to disk before its done flag is set (power-loss safety)."""
    for name, key in (("features", f"c/{k}/0"), ("valid", f"c/{k}"), ("failures", f"c/{k}")):
        f = store / name / key
        if f.exists():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@dataclass
class FeatureCache:
    """Read access to a finished (or partial) cache, for ``info``, stage two and eval."""

    path: Path
    group: zarr.Group
    meta: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "FeatureCache":
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise CacheError(f"{path}: not a featcache store (no zarr.json); build one with `featcache extract`")
        group = zarr.open_group(store=str(path), mode=mode, zarr_format=3)
        meta = group.attrs.get(ATTRS)
        if not isinstance(meta, dict) or "key" not in meta:
            raise CacheError(f"{path}: a Zarr group without featcache attributes")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{path}: cache format {meta.get('format_version')}, this featcache reads {FORMAT_VERSION}")
        return cls(path, group, dict(meta))

    # sizes and identity
    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def chunk_done(self) -> np.ndarray:
        return self.group["chunk_done"][:]

    # row-aligned arrays
    def valid(self) -> np.ndarray:
        return self.group["valid"][:]

    def labels(self) -> np.ndarray:
        return self.group["labels"][:]

    def classes(self) -> np.ndarray:
        return np.asarray(self.group["classes"][:], dtype=object)

    def strings(self, name: str) -> np.ndarray:
        """``paths``, ``domains``, ``splits`` or ``failures`` as an object array of str."""
        return np.asarray(self.group[name][:], dtype=object)

    def features(self, rows: np.ndarray | None = None, block_bytes: int = 64 << 20) -> np.ndarray:
        """All features, or the rows picked by a boolean mask or sorted index array, in one pass that
        selects block by block: memory peaks at the selection plus one block, not the whole array."""
        arr = self.group["features"]
        if rows is None:
            return arr[:]
        rows = np.asarray(rows)
        if rows.dtype != bool:
            if rows.size > 1 and not (np.diff(rows) > 0).all():
                return arr[:][rows]  # arbitrary order or repeats: fancy-index the whole array
            mask = np.zeros(self.rows, dtype=bool)
            mask[rows] = True
            rows = mask
        step = self.meta["rows_per_chunk"] * max(1, block_bytes // (self.meta["rows_per_chunk"] * arr.dtype.itemsize * self.dim))
        parts = [arr[i:i + step][rows[i:i + step]] for i in range(0, self.rows, step) if rows[i:i + step].any()]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=arr.dtype)

    def require_complete(self) -> None:
        if not self.complete:
            done = self.chunk_done()
            raise CacheError(
                f"{self.path}: extraction is not finished ({int(done.sum())} of {done.size} chunks done); "
                "run the same `featcache extract` command again to finish it"
            )

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def summary(self) -> dict[str, Any]:
        """Counts per split and domain, failures by reason, provenance and size: what ``info`` shows."""
        valid = self.valid()
        splits, domains = self.strings("splits"), self.strings("domains")
        failures = self.strings("failures")
        done = self.chunk_done()

        def counts(values: np.ndarray) -> dict[str, dict[str, int]]:
            names, inv = np.unique(values.astype(str), return_inverse=True)
            rows = np.bincount(inv, minlength=len(names))
            ok = np.bincount(inv, weights=valid, minlength=len(names)).astype(int)
            return {str(n): {"rows": int(r), "valid": int(v)} for n, r, v in zip(names, rows, ok)}

        done_rows = np.repeat(done, self.meta["rows_per_chunk"])[: self.rows]
        failed = ~valid & done_rows
        reasons: dict[str, int] = {}
        for r in failures[failed]:
            kind = str(r).split(":")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        return {
            "path": str(self.path),
            "key": self.key,
            "complete": self.complete,
            "chunks_done": int(done.sum()),
            "chunks": int(done.size),
            "rows": self.rows,
            "valid": int(valid.sum()),
            "failed": int(failed.sum()),
            "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            "failed_rows": [
                {"row": int(i), "path": str(p), "reason": str(r)}
                for i, p, r in zip(np.flatnonzero(failed)[:20], self.strings("paths")[failed][:20], failures[failed][:20])
            ],
            "classes": int(self.meta.get("classes", len(self.classes()))),
            "dim": self.dim,
            "dtype": self.meta["dtype"],
            "splits": counts(splits),
            "domains": counts(domains),
            "backbone": self.meta["backbone"],
            "preprocessing": self.meta["preprocessing"],
            "precision": self.meta.get("precision"),
            "manifest": self.meta.get("manifest"),
            "created": self.meta.get("created"),
            "completed": self.meta.get("completed"),
            "featcache_version": self.meta.get("featcache_version"),
            "bytes_on_disk": self.size_on_disk(),
        }


def mark_complete(path: str | os.PathLike, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Coordinator only: flag the store finished once every chunk is done (attrs are one file; one writer)."""
    group = zarr.open_group(store=str(path), mode="r+", zarr_format=3)
    done = group["chunk_done"][:]
    if not done.all():
        raise CacheError(f"{path}: {int((~done).sum())} chunks are not done; cannot mark complete")
    meta = dict(group.attrs[ATTRS])
    meta.update(extra or {})
    meta["complete"] = True
    meta["completed"] = _now()
    group.attrs[ATTRS] = meta
    return meta


def import_features(features: np.ndarray, manifest: Manifest, out: str | os.PathLike, *, source: str,
                    source_sha256: str, dtype: str = "float16", chunk_rows: int | None = None,
                    overwrite: bool = False, missing: np.ndarray | None = None,
                    missing_reason: str = "no embedding") -> dict[str, Any]:
    """Build a cache from embeddings computed elsewhere: row i of ``features`` (anything sliced by rows
    into an (n, dim) array) is row i of ``manifest``.

    Rows that are not finite (or overflow ``dtype``) are stored as failures, like undecodable images;
    so are the rows flagged in ``missing`` (bool, one per manifest row), with ``missing_reason``.
    """
    out = Path(out)
    if features.ndim != 2 or features.shape[1] < 1:
        raise CacheError(f"{source}: expected a 2-D array (rows, dim >= 1), got shape {features.shape}")
    if features.shape[0] != len(manifest):
        raise CacheError(
            f"{source} has {features.shape[0]} rows but {manifest.source} has {len(manifest)}: row i of the array must be row i of the manifest"
        )
    if out.exists() and not overwrite:
        raise CacheError(f"{out} already exists; pass --overwrite to replace it")
    dim = int(features.shape[1])
    rows = chunk_rows or default_rows_per_chunk(dim, dtype)
    backbone = {"name": "import", "library": "import", "arch": source, "pretrained": None,
                "weights": f"sha256:{source_sha256}", "dim": dim}
    meta = build_meta(manifest, backbone, {"library": "import"}, dtype, "n/a", rows)
    tmp = out.with_name(out.name + ".importing")
    create_store(tmp, manifest, meta)
    group = zarr.open_group(store=str(tmp), mode="r+", zarr_format=3)
    n_chunks = math.ceil(len(manifest) / rows)
    for k in range(n_chunks):
        sl = slice(k * rows, min(len(manifest), (k + 1) * rows))
        block = np.asarray(features[sl], dtype=np.float32).astype(dtype)
        ok = np.isfinite(block).all(axis=1)
        reasons = np.where(ok, "", f"non-finite embedding in {Path(source).name}")
        if missing is not None:
            ok &= ~missing[sl]
            reasons = np.where(missing[sl], missing_reason, reasons)
        group["features"][sl] = np.where(ok[:, None], block, 0)
        group["valid"][sl] = ok
        group["failures"][sl] = reasons.astype(object)
        group["chunk_done"][k] = True
    mark_complete(tmp)
    install(tmp, out)
    return FeatureCache.open(out).meta


def import_npy(path: str | os.PathLike, manifest: Manifest, out: str | os.PathLike, *, dtype: str = "float16",
               chunk_rows: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """:func:`import_features` from a ``.npy`` file (memory-mapped, never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"--features {path}: file not found")
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise CacheError(f"--features {path}: not a .npy array ({e})") from None
    return import_features(features, manifest, out, source=str(path), source_sha256=file_sha256(path), dtype=dtype,
                           chunk_rows=chunk_rows, overwrite=overwrite)

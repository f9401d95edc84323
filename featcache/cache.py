"""The feature cache: a Zarr v3 group written once per (manifest, backbone, preprocessing, dtype).

Layout (ARCHITECTURE.md, "The feature cache", says why it is so):

- ``features`` (N, D) float16/float32, raw backbone output; chunks are whole rows, uncompressed.
- ``valid`` (N,) bool and ``failures`` (N,) str, chunked like ``features`` rows.
- ``augmented`` (N, V, D), only in a cache extracted with ``--views V --augment NAME``: V augmented views
  of every row (``features`` stays the clean eval view), chunked by the same rows; attrs
  ``augmentation`` say how they were made.
- ``labels`` (N,) int64 into ``classes``; ``paths``, ``domains``, ``splits`` (N,) str; ``classes`` (C,) str.
- ``chunk_done`` (n_chunks,) bool, one file per flag: chunk k is done once its flag is set.
- attrs ``featcache``: provenance and the cache ``key``.

The store is created whole by one coordinator (atomically, via a temporary folder and a rename);
workers then own disjoint whole chunks and never resize or re-create anything.
"""

from __future__ import annotations

import contextlib
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
from zarr.codecs import Crc32cCodec

from featcache import __version__
from featcache.files import check_replaceable, exclusive, install_dir, temp_dir_beside
from featcache.manifest import Manifest
from featcache.storage import Remote, Where, absolute, filesystem_options, local_file, location

FORMAT_VERSION = 1
ATTRS = "featcache"
TARGET_CHUNK_BYTES = 4 << 20
# What changes the numbers, and so the key. Everything else in the attrs is provenance.
KEY_FIELDS = ("format_version", "manifest_sha256", "backbone", "preprocessing", "dtype", "precision")
# In the key only when set, so that caches made before they existed keep their keys.
OPTIONAL_KEY_FIELDS = ("augmentation",)


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message names the store and what is wrong."""


def safe_name(text: str) -> str:
    """A model name as a file name: ``open_clip:ViT-B-32@openai`` -> ``open_clip-ViT-B-32@openai``."""
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", text).strip("-")


def default_rows_per_chunk(dim: int, dtype: str) -> int:
    """A power of two giving chunks of about 4 MB (2,048 rows for 1152-d float16)."""
    row_bytes = dim * np.dtype(dtype).itemsize
    return max(1, 2 ** round(math.log2(max(1, TARGET_CHUNK_BYTES / row_bytes))))


_DIGESTS: dict[tuple, str] = {}  # (file identity, size, mtime) -> sha256, for this process


def file_sha256(path: str | os.PathLike, block: int = 1 << 24) -> str:
    """The sha256 of a file's bytes (weights and imported arrays are recorded by it). Remembered while the
    file is unchanged: a multi-GB checkpoint checked by export and then loaded is read once."""
    st = os.stat(path)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if identity not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
        _DIGESTS[identity] = h.hexdigest()
    return _DIGESTS[identity]


def cache_key(meta: dict[str, Any]) -> str:
    payload = {k: meta[k] for k in KEY_FIELDS}
    payload.update({k: meta[k] for k in OPTIONAL_KEY_FIELDS if meta.get(k) is not None})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def key_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two caches' key fields."""
    out = []
    for k in KEY_FIELDS + OPTIONAL_KEY_FIELDS:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "augmentation" and not (a and b):
            out.append(f"augmented views: {_views_text(a)} in the store, {_views_text(b)} requested")
        elif isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub) and sub != "name":
                    out.append(f"{k}.{sub}: {a.get(sub)!r} in the store, {b.get(sub)!r} requested")
        else:
            out.append(f"{k}: {a!r} in the store, {b!r} requested")
    return out or ["the cache key"]


def _views_text(augmentation: dict[str, Any] | None) -> str:
    return f"{augmentation['views']} ({augmentation['augment']})" if augmentation else "none"


def feature_space(meta: dict[str, Any]) -> dict[str, Any]:
    """What makes two caches' vectors comparable. For extracted features: the backbone (weights included,
    its alias left out), the preprocessing and the precision. An imported cache records its own: the
    space its source declared (a featcache embeddings folder says which cache, and which head, made its
    vectors; ``import --space NAME`` names any other source's), or else the source file itself."""
    if isinstance(meta.get("feature_space"), dict):
        return meta["feature_space"]
    backbone = {k: v for k, v in meta["backbone"].items() if k != "name"}
    return {"backbone": backbone, "preprocessing": meta["preprocessing"], "precision": meta.get("precision")}


def head_space(features: dict[str, Any], head_sha256: str) -> dict[str, Any]:
    """The space of a trained head's embeddings: the head (by the sha256 of its weights file) applied to
    vectors of the space ``features``."""
    return {"head": f"sha256:{head_sha256}", "features": features}


def describe_space(space: dict[str, Any]) -> str:
    """A feature space in a few words, for error messages."""
    if "head" in space:
        return f"head {space['head'][:19]} on {describe_space(space['features'])}"
    if "declared" in space:
        return f"declared space {space['declared']!r}"
    if "import" in space:
        return f"imported vectors ({space['import'][:19]})"
    b = space.get("backbone", {})
    return f"{b.get('library')}:{b.get('arch')} ({str(b.get('weights'))[:24]})"


def build_meta(manifest: Manifest, backbone: dict[str, Any], preprocessing: dict[str, Any], dtype: str,
               precision: str, rows_per_chunk: int, augmentation: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {
        "format_version": FORMAT_VERSION,
        "manifest_sha256": manifest.content_sha256(),
        "backbone": backbone,
        "preprocessing": preprocessing,
        "dtype": dtype,
        "precision": precision,
        "manifest": str(manifest.source),
        "root": absolute(manifest.root),  # absolute: the cache works from any working directory
        "rows": len(manifest),
        "dim": backbone["dim"],
        "classes": len(manifest.classes),
        "rows_per_chunk": rows_per_chunk,
        "created": _now(),
        "featcache_version": __version__,
        "complete": False,
    }
    if augmentation is not None:
        meta["augmentation"] = augmentation
    meta["key"] = cache_key(meta)
    return meta


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def zarr_store(path: Where, read_only: bool = False):
    """What zarr opens for ``path``: the folder itself, or an fsspec store for a URL (each chunk one object)."""
    if isinstance(path, Remote):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(path.url, storage_options=filesystem_options(),
                                    read_only=read_only)
    return str(path)


def create_store(path: str | os.PathLike | Remote, manifest: Manifest, meta: dict[str, Any]) -> None:
    """Create the whole store at full size, atomically: it appears under ``path`` complete or not at all (on
    an object store: its ``zarr.json``, which makes it a store, is the last object written)."""
    path = location(path)
    tmp = temp_dir_beside(path)  # unique: two runs never build in the same place
    try:
        build_store(tmp, manifest, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    install(tmp, path)


def build_store(tmp: Path, manifest: Manifest, meta: dict[str, Any]) -> None:
    """The store's arrays at full size and its attributes, in the new empty folder ``tmp``."""
    n, dim, rows = len(manifest), meta["dim"], meta["rows_per_chunk"]
    root = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
    # No compression (it gains ~7 % on embeddings: ARCHITECTURE.md), but a crc32c per chunk: a damaged chunk fails
    # to read instead of reading as other numbers.
    checksum = [Crc32cCodec()]
    root.create_array("features", shape=(n, dim), chunks=(rows, dim), dtype=meta["dtype"], fill_value=0,
                      compressors=checksum, config={"write_empty_chunks": True})
    if meta.get("augmentation"):
        views = int(meta["augmentation"]["views"])
        root.create_array("augmented", shape=(n, views, dim), chunks=(rows, views, dim), dtype=meta["dtype"],
                          fill_value=0, compressors=checksum, config={"write_empty_chunks": True})
    root.create_array("valid", shape=(n,), chunks=(rows,), dtype=bool, fill_value=False, compressors=checksum,
                      config={"write_empty_chunks": True})
    root.create_array("failures", shape=(n,), chunks=(rows,), dtype=str, fill_value="", compressors=checksum)
    root.create_array("chunk_done", shape=(math.ceil(n / rows),), chunks=(1,), dtype=bool, fill_value=False,
                      compressors=None)
    _write_rows(root, manifest)
    root.attrs[ATTRS] = meta


def install(tmp: Path, path: Where) -> None:
    """Move a finished store into place; an existing one is replaced only once the new one is whole (files a
    user added inside the old one are kept)."""
    install_dir(tmp, path, record="zarr.json", owned=_store_owned)


STORE_ARRAYS = ("features", "augmented", "valid", "failures", "labels", "classes", "paths", "domains", "splits",
                "chunk_done")


def _store_owned(rel: str) -> bool:
    return rel == "zarr.json" or rel.split("/")[0] in STORE_ARRAYS


ROW_ARRAYS = {"features": 2, "valid": 1, "failures": 1, "augmented": 3}  # chunked by rows, written by extract: name -> ndim


def row_arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    """The row arrays the store has (``augmented`` only with views), opened for writing whole chunks, the
    all-zero ones included: Zarr keeps ``write_empty_chunks`` only for the session that created an array,
    and a chunk it skips is indistinguishable from a lost one."""
    return {name: group[name].with_config({"write_empty_chunks": True}) for name in ROW_ARRAYS if name in group}


def _plain_chunks(arr: zarr.Array) -> bool:
    """Each chunk object is the chunk's values, little-endian, then their crc32c, under the default keys: how
    featcache stores ``features``, ``augmented`` and ``valid`` (so an object store's chunks can be read
    without zarr's machinery)."""
    from zarr.codecs import BytesCodec

    codecs = arr.metadata.codecs
    return (len(codecs) == 2 and isinstance(codecs[0], BytesCodec)
            and getattr(codecs[0].endian, "value", codecs[0].endian) in (None, "little")
            and isinstance(codecs[1], Crc32cCodec) and getattr(arr.metadata.chunk_key_encoding, "separator", None) == "/"
            and arr.dtype.kind in "fb" and arr.chunks[1:] == arr.shape[1:])


def chunk_file(name: str, ndim: int, k: int) -> str:
    """Row chunk k's file inside array ``name`` (its key under the default chunk key encoding)."""
    return f"{name}/c/{k}" + "/0" * (ndim - 1)


def is_cache(path: Where) -> bool:
    """``path`` is a store featcache wrote: a Zarr group whose attributes hold featcache's record."""
    try:
        meta = json.loads((path / "zarr.json").read_text()).get("attributes", {}).get(ATTRS)
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(meta, dict) and "key" in meta


def check_cache_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that holds anything but a featcache cache, and a cache without ``overwrite``."""
    check_replaceable(out, is_cache, "a feature cache", overwrite)


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


def remove_partial_files(path: Where) -> int:
    """Delete ``*.partial`` chunk files a killed writer left behind; returns how many. (An object store
    has none: an object is put whole or not at all.)"""
    count = 0
    if isinstance(path, Remote):
        return 0
    for p in Path(path).rglob("*.partial"):
        p.unlink(missing_ok=True)
        count += 1
    return count


def fsync_chunk_files(store: Where, k: int) -> None:
    """Flush chunk k of the row arrays to disk before its done flag is set (power-loss safety). On an object
    store a PUT is durable once it returns."""
    if isinstance(store, Remote):
        return
    for name, ndim in ROW_ARRAYS.items():
        f = store / chunk_file(name, ndim, k)
        if f.exists():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class StoreWriter:
    """The one way rows get into a store: whole row chunks, each written, flushed to disk and only then
    flagged done; and the flags and attributes a coordinator changes. Workers own disjoint chunks."""

    def __init__(self, path: str | os.PathLike | Remote):
        self.path = location(path)
        self.group = zarr.open_group(store=zarr_store(self.path), mode="r+", zarr_format=3)
        self.arrays = row_arrays(self.group)
        self.meta: dict[str, Any] = dict(self.group.attrs[ATTRS])
        self.rows_per_chunk = int(self.meta["rows_per_chunk"])
        self.rows = int(self.meta["rows"])

    @property
    def views(self) -> int:
        return self.arrays["augmented"].shape[1] if "augmented" in self.arrays else 0

    def chunk_rows(self, k: int) -> slice:
        return slice(k * self.rows_per_chunk, min(self.rows, (k + 1) * self.rows_per_chunk))

    def done(self) -> np.ndarray:
        return self.group["chunk_done"][:]

    def write_chunk(self, k: int, features: np.ndarray, valid: np.ndarray, failures: np.ndarray,
                    augmented: np.ndarray | None = None) -> None:
        """Row chunk ``k`` whole: ``features`` (rows, D), ``valid``, ``failures`` (object array of str) and, in a
        store with views, ``augmented`` (rows, V, D); then its done flag."""
        sl = self.chunk_rows(k)
        self.arrays["features"][sl] = features
        if self.views:
            self.arrays["augmented"][sl] = augmented
        self.arrays["valid"][sl] = valid
        self.arrays["failures"][sl] = failures
        fsync_chunk_files(self.path, k)
        self.group["chunk_done"][k] = True

    def undo(self, chunks: list[int]) -> None:
        """Coordinator: flag ``chunks`` not done, so that the run redoes them."""
        for k in chunks:
            self.group["chunk_done"][int(k)] = False

    def update_attrs(self, **changes: Any) -> dict[str, Any]:
        """Coordinator only (attrs are one file): change the record's fields, returning the new record."""
        self.meta.update(changes)
        self.group.attrs[ATTRS] = self.meta
        return dict(self.meta)


def _check_meta(path: Where, meta: dict[str, Any]) -> None:
    """The attributes every reader relies on, present and of the right kind; else one line naming them."""
    def bad(what: str) -> CacheError:
        return CacheError(f"{path / 'zarr.json'}: damaged featcache attributes ({what}); extract the cache again")

    for name in ("rows", "dim", "rows_per_chunk"):
        value = meta.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "rows" else 1):
            raise bad(f"{name} = {value!r}")
    backbone = meta.get("backbone")
    if not isinstance(backbone, dict) or not all(isinstance(backbone.get(k), str) for k in ("name", "library", "weights")):
        raise bad(f"backbone = {backbone!r}"[:120])
    for name in ("preprocessing",):
        if not isinstance(meta.get(name), dict):
            raise bad(f"{name} missing")
    if meta.get("dtype") not in ("float16", "float32"):
        raise bad(f"dtype = {meta.get('dtype')!r}")


@dataclass(frozen=True)
class ChunkProblem:
    chunk: int  # the row chunk (rows chunk*R .. (chunk+1)*R)
    file: Where
    reason: str


def describe_problems(problems: list[ChunkProblem], most: int = 3) -> str:
    text = "; ".join(f"{p.file} ({p.reason})" for p in problems[:most])
    return text + (f"; and {len(problems) - most} more" if len(problems) > most else "")


@dataclass
class FeatureCache:
    """Read access to a finished (or partial) cache, for ``info``, stage two and eval."""

    path: Where
    group: zarr.Group
    meta: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike | Remote, mode: str = "r") -> "FeatureCache":
        path = location(path)
        if not (path / "zarr.json").is_file():
            raise CacheError(f"{path}: not a featcache store (no zarr.json); build one with `featcache extract`")
        try:
            group = zarr.open_group(store=zarr_store(path, read_only=mode == "r"), mode=mode, zarr_format=3)
            meta = group.attrs.get(ATTRS)
        except Exception as e:  # zarr reports a damaged zarr.json in several ways
            raise CacheError(f"{path / 'zarr.json'}: not readable as a featcache store ({type(e).__name__})") from None
        if not isinstance(meta, dict) or "key" not in meta:
            raise CacheError(f"{path}: a Zarr group without featcache attributes")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{path}: cache format {meta.get('format_version')}, this featcache reads {FORMAT_VERSION}")
        _check_meta(path, meta)
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
    def augmentation(self) -> dict[str, Any] | None:
        """How the ``augmented`` views were made ({augment, views, seed, ...}), or None without views."""
        return self.meta.get("augmentation")

    @property
    def views(self) -> int:
        return int(self.augmentation["views"]) if self.augmentation else 0

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def chunk_done(self) -> np.ndarray:
        return self.group["chunk_done"][:]

    # row-aligned arrays
    def valid(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Whether each row (of ``rows``: a mask or increasing row numbers) holds a real embedding."""
        return self._read_rows("valid", rows, 64 << 20, None)

    def labels(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Label codes (into ``classes``) of every row, or of the sorted ``rows`` given."""
        return self.group["labels"][:] if rows is None else self._picked("labels", rows)

    def classes(self) -> np.ndarray:
        return np.asarray(self.group["classes"][:], dtype=object)

    def strings(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """``paths``, ``domains``, ``splits`` or ``failures`` as an object array of str: of every row, or of the
        sorted ``rows`` given (reading only the span that holds them)."""
        if rows is None:
            return np.asarray(self.group[name][:], dtype=object)
        return np.asarray(self._picked(name, rows), dtype=object)

    def _picked(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Values of the sorted ``rows`` of a one-dimensional array: one read of their span when they are dense,
        else only the chunks that hold them (a few neighbours among 100M rows)."""
        arr = self.group[name]
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.asarray(arr[0:0])
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo <= 2 * len(rows) + arr.chunks[0]:
            return np.asarray(arr[lo:hi])[rows - lo]
        return np.asarray(arr.oindex[rows])

    def features(self, rows: np.ndarray | None = None, block_bytes: int = 64 << 20, out: np.ndarray | None = None) -> np.ndarray:
        """All features, or the rows picked by a boolean mask or sorted index array, in one pass that
        selects block by block: memory peaks at the selection plus one block, not the whole array (with
        ``out``, an array of the selection's shape to fill, at one block). A chunk whose checksum does not
        match is a one-line CacheError naming it."""
        return self._read_rows("features", rows, block_bytes, out)

    def augmented(self, rows: np.ndarray | None = None, block_bytes: int = 64 << 20, out: np.ndarray | None = None) -> np.ndarray:
        """The augmented views (rows, V, D) of all rows or the selected ones, read like ``features``."""
        if "augmented" not in self.group:
            raise CacheError(f"{self.path}: no augmented views; extract with --views V --augment NAME to make them")
        return self._read_rows("augmented", rows, block_bytes, out)

    def _read_rows(self, name: str, rows: np.ndarray | None, block_bytes: int, out: np.ndarray | None) -> np.ndarray:
        try:
            return self._rows_of(self.group[name], rows, block_bytes, out)
        except ValueError as e:  # zarr's crc32c codec: "Stored and computed checksum do not match"
            problems = self.chunk_problems(read=True)
            if not problems:
                raise
            raise self._damaged(problems) from e

    def _rows_of(self, arr: zarr.Array, rows: np.ndarray | None, block_bytes: int, out: np.ndarray | None) -> np.ndarray:
        """The ``rows`` (a mask, or increasing row numbers) of ``arr``, reading only the chunks of the span they
        lie in: a block of a 100M-row cache costs that block, not a pass over the whole."""
        per_chunk = self.meta["rows_per_chunk"]
        if rows is None:
            rows = np.ones(self.rows, dtype=bool)
        rows = np.asarray(rows)
        if rows.dtype != bool:
            if rows.size > 1 and not (np.diff(rows) > 0).all():
                picked = arr[:][rows]  # arbitrary order or repeats: fancy-index the whole array
                if out is None:
                    return picked
                out[...] = picked
                return out
            start = (int(rows[0]) // per_chunk) * per_chunk if rows.size else 0
            span = np.zeros((int(rows[-1]) + 1 - start) if rows.size else 0, dtype=bool)
            span[rows - start] = True
        else:
            start, span = 0, rows
        if out is None:
            out = np.empty((int(span.sum()), *arr.shape[1:]), dtype=arr.dtype)
        if isinstance(self.path, Remote) and _plain_chunks(arr) and arr.chunks[0] == per_chunk \
                and self._fetch_rows(arr, start, span, out):
            return out
        row_bytes = arr.dtype.itemsize * math.prod(arr.shape[1:])
        step = per_chunk * max(1, block_bytes // (per_chunk * row_bytes))
        filled = 0
        for i in range(0, len(span), step):
            block = span[i:i + step]
            if block.any():
                n = int(block.sum())
                out[filled:filled + n] = arr[start + i:start + i + len(block)][block]
                filled += n
        return out

    def _fetch_rows(self, arr: zarr.Array, start: int, span: np.ndarray, out: np.ndarray, batch: int = 64) -> bool:
        """The rows ``start + flatnonzero(span)`` (``start`` a chunk boundary) of a plain row array on an object
        store into ``out``, fetching its chunk objects many at a time and checking their crc32c here: about 1.5x
        zarr's own read of the same objects (BENCHMARKS.md, "Object stores"). False, with nothing promised
        about ``out``, where a chunk is missing or does not check out: the caller's zarr read then gives zarr's
        answer (fill values, or the error)."""
        import google_crc32c

        per_chunk, width = self.meta["rows_per_chunk"], arr.shape[1:]
        chunks = (start + np.unique(np.flatnonzero(span) // per_chunk * per_chunk)) // per_chunk
        filled = 0
        for lo in range(0, len(chunks), batch):  # a batch of 4 MB chunks at a time bounds the memory held
            keys = {int(k): (self.path / chunk_file(arr.basename, arr.ndim, int(k))).key for k in chunks[lo:lo + batch]}
            got = self.path.fs.cat(list(keys.values()), batch_size=32, on_error="return")
            for k, key in keys.items():
                data = got.get(key)
                if not isinstance(data, bytes) or len(data) < 4 or \
                        np.uint32(google_crc32c.value(data[:-4])).tobytes() != data[-4:]:
                    return False
                block = np.frombuffer(data, dtype=arr.dtype.newbyteorder("<"), count=per_chunk * math.prod(width)).reshape(per_chunk, *width)
                wanted = span[k * per_chunk - start:(k + 1) * per_chunk - start]
                n = int(wanted.sum())
                out[filled:filled + n] = block[:n] if n == len(wanted) else block[:len(wanted)][wanted]
                filled += n
        return True

    def require_complete(self) -> None:
        """Refuse a cache that is not finished, or whose chunk files are missing or of the wrong size."""
        if not self.complete:
            done = self.chunk_done()
            raise CacheError(
                f"{self.path}: extraction is not finished ({int(done.sum())} of {done.size} chunks done); "
                "run the same `featcache extract` command again to finish it"
            )
        problems = self.chunk_problems()
        if problems:
            raise self._damaged(problems)

    def _damaged(self, problems: list["ChunkProblem"]) -> CacheError:
        return CacheError(f"{self.path}: {len(problems)} damaged chunk file(s): {describe_problems(problems)}; run the "
                          "`featcache extract` command that made it again: it redoes exactly these chunks")

    def chunk_problems(self, read: bool = False) -> list["ChunkProblem"]:
        """The done chunks whose files are missing or of the wrong size; with ``read``, also those that do
        not read back (their crc32c does not match). A stat per file, or one full read with ``read``."""
        done = np.flatnonzero(self.chunk_done())
        rows_per_chunk = self.meta["rows_per_chunk"]
        problems = []
        for name in ROW_ARRAYS:
            if name not in self.group:
                continue
            arr = self.group[name]
            crc = any(isinstance(c, Crc32cCodec) for c in arr.metadata.codecs)  # stores before checksums: none
            width = math.prod(arr.shape[1:])
            # fixed-size chunks (features, valid, augmented): padded to whole chunks, plus the 4-byte checksum
            size = None if name == "failures" else rows_per_chunk * width * arr.dtype.itemsize + (4 if crc else 0)
            listed = (self.path / name).files() if isinstance(self.path, Remote) else None  # one listing, not a HEAD each
            for k in done:
                f = self.path / chunk_file(name, arr.ndim, int(k))
                try:
                    have = f.stat().st_size if listed is None else listed[chunk_file(name, arr.ndim, int(k))[len(name) + 1:]]
                except (FileNotFoundError, KeyError):
                    if name != "failures":  # a chunk of empty reasons (all rows valid) is never written
                        problems.append(ChunkProblem(int(k), f, "missing"))
                    continue
                if size is not None and have != size:
                    problems.append(ChunkProblem(int(k), f, f"{have} bytes, expected {size}"))
                elif read:
                    try:
                        arr[k * rows_per_chunk:min(self.rows, (k + 1) * rows_per_chunk)]
                    except Exception as e:  # the codec's checksum or decoding error
                        problems.append(ChunkProblem(int(k), f, (str(e).splitlines() or [type(e).__name__])[0][:80]))
        return problems

    def size_on_disk(self) -> int:
        if isinstance(self.path, Remote):
            return sum(self.path.files().values())
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def _readable(self, name: str, empty: Any) -> np.ndarray:
        """A row array chunk by chunk, a chunk that does not read back (damaged) as ``empty``: ``info`` reports
        the damage instead of failing on it."""
        arr, step = self.group[name], self.meta["rows_per_chunk"]
        try:
            return arr[:]
        except ValueError:
            out = np.full(self.rows, empty, dtype=object if isinstance(empty, str) else type(empty))
            for i in range(0, self.rows, step):
                with contextlib.suppress(ValueError):
                    out[i:i + step] = arr[i:i + step]
            return out

    def summary(self) -> dict[str, Any]:
        """Counts per split and domain, failures by reason, provenance and size: what ``info`` shows."""
        valid = self._readable("valid", False)
        splits, domains = self.strings("splits"), self.strings("domains")
        failures = np.asarray(self._readable("failures", ""), dtype=object)
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
            "damaged_chunks": [f"{p.file} ({p.reason})" for p in self.chunk_problems()],
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
            "augmentation": self.augmentation,
            "manifest": self.meta.get("manifest"),
            "created": self.meta.get("created"),
            "completed": self.meta.get("completed"),
            "featcache_version": self.meta.get("featcache_version"),
            "bytes_on_disk": self.size_on_disk(),
        }


def mark_complete(path: str | os.PathLike | Remote, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Coordinator only: flag the store finished once every chunk is done (attrs are one file; one writer)."""
    store = StoreWriter(path)
    done = store.done()
    if not done.all():
        raise CacheError(f"{path}: {int((~done).sum())} chunks are not done; cannot mark complete")
    return store.update_attrs(**(extra or {}), complete=True, completed=_now())


def import_features(features: np.ndarray, manifest: Manifest, out: str | os.PathLike | Remote, *, source: str,
                    source_sha256: str, dtype: str = "float16", chunk_rows: int | None = None,
                    overwrite: bool = False, missing: np.ndarray | None = None,
                    missing_reason: str = "no embedding", space: dict[str, Any] | str | None = None) -> dict[str, Any]:
    """Build a cache from embeddings computed elsewhere: row i of ``features`` (anything sliced by rows
    into an (n, dim) array) is row i of ``manifest``.

    Rows that are not finite are stored as failures, like undecodable images (a finite value ``dtype``
    cannot hold is refused); so are the rows flagged in ``missing`` (bool, one per manifest row), with
    ``missing_reason``. ``space`` says which vectors these are (see :func:`feature_space`): a dict
    recorded by the featcache export they came from, a name the user declares, or None (the vectors of
    this source only). Returns the cache's attributes plus ``non_finite`` and ``missing`` row counts.
    """
    out = location(out)
    if features.ndim != 2 or features.shape[1] < 1:
        raise CacheError(f"{source}: expected a 2-D array (rows, dim >= 1), got shape {features.shape}")
    if features.shape[0] != len(manifest):
        raise CacheError(
            f"{source} has {features.shape[0]} rows but {manifest.source} has {len(manifest)}: row i of the array must be row i of the manifest"
        )
    kind = np.asarray(features[0:0]).dtype
    if kind.kind not in "biuf":
        raise CacheError(f"{source}: values of dtype {kind} are not real numbers; featcache stores real embeddings only")
    with exclusive(out, "a feature cache"):
        check_cache_out(out, overwrite)
        dim = int(features.shape[1])
        rows = chunk_rows or default_rows_per_chunk(dim, dtype)
        backbone = {"name": "import", "library": "import", "arch": source, "pretrained": None,
                    "weights": f"sha256:{source_sha256}", "dim": dim}
        meta = build_meta(manifest, backbone, {"library": "import"}, dtype, "n/a", rows)
        meta["feature_space"] = (space if isinstance(space, dict) else {"declared": space} if space
                                 else {"import": f"sha256:{source_sha256}"})
        non_finite = 0
        tmp = temp_dir_beside(out)
        try:
            build_store(tmp, manifest, meta)
            store = StoreWriter(tmp)
            for k in range(math.ceil(len(manifest) / rows)):
                sl = store.chunk_rows(k)
                exact = np.asarray(features[sl], dtype=np.float64)
                with np.errstate(over="ignore"):  # overflow is checked on the next line, and refused
                    block = exact.astype(dtype)
                overflow = np.isfinite(exact) & ~np.isfinite(block)
                if overflow.any():
                    i, j = np.argwhere(overflow)[0]
                    hint = "import with --dtype float32" if dtype == "float16" else "scale the vectors first"
                    raise CacheError(f"{source}: row {sl.start + i}: value {exact[i, j]:g} does not fit {dtype} (largest "
                                     f"{np.finfo(dtype).max:g}); nothing was written: {hint}")
                ok = np.isfinite(block).all(axis=1)
                non_finite += int((~ok & ~(missing[sl] if missing is not None else False)).sum())
                reasons = np.where(ok, "", f"non-finite embedding in {Path(source).name}")
                if missing is not None:
                    ok &= ~missing[sl]
                    reasons = np.where(missing[sl], missing_reason, reasons)
                store.write_chunk(k, np.where(ok[:, None], block, 0), ok, reasons.astype(object))
            mark_complete(tmp)
            install(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {**FeatureCache.open(out).meta, "non_finite": non_finite,
            "missing": int(missing.sum()) if missing is not None else 0}


def import_npy(path: str | os.PathLike, manifest: Manifest, out: str | os.PathLike, *, dtype: str = "float16",
               chunk_rows: int | None = None, overwrite: bool = False, space: str | None = None) -> dict[str, Any]:
    """:func:`import_features` from a ``.npy`` file (memory-mapped, never unpickled; one on an object store is
    read through a local copy)."""
    where = location(path)
    if not where.is_file():
        raise CacheError(f"--features {where}: file not found")
    with local_file(where) as path:
        try:
            features = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise CacheError(f"--features {where}: not a .npy array ({type(e).__name__}: {e})") from None
        return import_features(features, manifest, out, source=str(where), source_sha256=file_sha256(path), dtype=dtype,
                               chunk_rows=chunk_rows, overwrite=overwrite, space=space)

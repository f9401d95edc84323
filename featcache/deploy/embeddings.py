"""Embeddings in the layout of the LAION ecosystem (clip-retrieval writes it; embedding-reader and
autofaiss read it), out of featcache and back in.

``DIR/img_emb/img_emb_{i}.npy``: shard i's embeddings (rows, dim); ``DIR/metadata/metadata_{i}.parquet``:
the same rows' ``image_path``, ``label``, ``domain``, ``split``. Shard i of both are row-aligned.
``image_path`` is the manifest's own path (relative to its root, or absolute).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from featcache import __version__
from featcache.cache import feature_space, file_sha256, import_features
from featcache.deploy.embedder import DeployError, collection
from featcache.evaluate.search import l2_normalize
from featcache.files import build_dir, strict_json
from featcache.manifest import Manifest, resolve
from featcache.storage import absolute, is_url, local_dir, location

EMB_DIR, META_DIR = "img_emb", "metadata"
MARKER = "featcache-embeddings.json"  # what featcache wrote here, and from what
COLUMNS = ("image_path", "label", "domain", "split")
SHARD = re.compile(r"img_emb_(\d+)\.npy")
OWNED = re.compile(rf"{MARKER}|{EMB_DIR}|{META_DIR}|{EMB_DIR}/img_emb_\d+\.npy|{META_DIR}/metadata_\d+\.parquet")


def _owned(rel: str) -> bool:
    """The files ``export-embeddings`` writes: whatever else a user put in the folder survives --overwrite."""
    return OWNED.fullmatch(rel) is not None


def export_embeddings(cache_path: str | os.PathLike, out: str | os.PathLike, *, run: str | os.PathLike | None = None,
                      shard_rows: int = 1_000_000, overwrite: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write every valid row of a cache: the run's L2-normalised head embeddings (float32) with ``run``,
    else the raw features (in the cache's dtype). Returns what the marker file records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shard_rows < 1:
        raise DeployError(f"--shard-rows {shard_rows}: must be at least 1")
    out = location(out)
    cache, rows, head_run = collection(cache_path, run)
    paths, domains, splits = cache.strings("paths"), cache.strings("domains"), cache.strings("splits")
    labels = cache.classes()[cache.labels()]
    record: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        (tmp / EMB_DIR).mkdir()
        (tmp / META_DIR).mkdir()
        for i, lo in enumerate(range(0, len(rows), shard_rows)):
            part = rows[lo:lo + shard_rows]
            feats = cache.features(part)
            emb = l2_normalize(head_run.embed(feats)) if head_run is not None else feats
            np.save(tmp / EMB_DIR / f"img_emb_{i}.npy", emb, allow_pickle=False)
            pq.write_table(pa.table({
                "image_path": pa.array(paths[part].tolist(), pa.string()),
                "label": pa.array([str(x) for x in labels[part]], pa.string()),
                "domain": pa.array(domains[part].tolist(), pa.string()),
                "split": pa.array(splits[part].tolist(), pa.string()),
            }), tmp / META_DIR / f"metadata_{i}.parquet")
            if progress:
                progress(lo + len(part), len(rows))
        record.update({
            "featcache_version": __version__,
            "cache": absolute(cache.path, resolve=True),
            "cache_key": cache.key,
            "run": absolute(head_run.path, resolve=True) if head_run is not None else None,
            "embeddings": "run head, L2-normalised" if head_run is not None else "raw backbone features",
            # which vectors these are: `featcache import` gives the cache it makes of them this same space
            "feature_space": head_run.embedding_space() if head_run is not None else feature_space(cache.meta),
            "rows": int(len(rows)),
            "dim": int(emb.shape[1]),
            "dtype": str(emb.dtype),
            "shards": i + 1,
            "root": absolute(cache.meta["root"]),
        })
        (tmp / MARKER).write_text(strict_json(record) + "\n")

    build_dir(out, build, record=MARKER, what="an embeddings folder", overwrite=overwrite,
              owned=_owned)
    return record


@dataclass
class Shard:
    embeddings: Path
    metadata: Path


def list_shards(folder: str | os.PathLike) -> list[Shard]:
    """The (img_emb_i.npy, metadata_i.parquet) pairs of a folder, in shard order; a shard without its
    partner is an error naming it."""
    folder = Path(folder)
    emb_dir, meta_dir = folder / EMB_DIR, folder / META_DIR
    if not emb_dir.is_dir() or not meta_dir.is_dir():
        raise DeployError(f"{folder}: expected {EMB_DIR}/img_emb_{{i}}.npy and {META_DIR}/metadata_{{i}}.parquet")
    numbers = sorted(int(m.group(1)) for f in emb_dir.iterdir() if (m := SHARD.fullmatch(f.name)) and not f.is_dir())
    if not numbers:
        raise DeployError(f"{emb_dir}: no img_emb_{{i}}.npy files")
    shards = []
    for i in numbers:
        meta = meta_dir / f"metadata_{i}.parquet"
        if not meta.is_file():
            raise DeployError(f"{emb_dir / f'img_emb_{i}.npy'} has no {meta}" + (" (a folder)" if meta.exists() else ""))
        shards.append(Shard(emb_dir / f"img_emb_{i}.npy", meta))
    return shards


class _Gathered:
    """Manifest-ordered rows gathered from memory-mapped shards: ``[rows]`` gives an (n, dim) array, zeros
    where a row has no embedding. What ``import_features`` reads a chunk at a time."""

    def __init__(self, arrays: list[np.ndarray], shard_of: np.ndarray, position: np.ndarray, dim: int):
        self.arrays, self.shard_of, self.position = arrays, shard_of, position
        self.shape, self.ndim = (len(shard_of), dim), 2
        # staged in a type that holds every shard's values exactly (float64 for float64 or integer shards):
        # import_features decides what fits the cache's dtype, as it does for a .npy
        self.dtype = np.result_type(np.float32, *(a.dtype for a in arrays))

    def __getitem__(self, rows: slice) -> np.ndarray:
        shard_of, position = self.shard_of[rows], self.position[rows]
        block = np.zeros((len(shard_of), self.shape[1]), dtype=self.dtype)
        for s in np.unique(shard_of[shard_of >= 0]):
            take = shard_of == s
            order = np.argsort(position[take])  # ascending offsets: sequential reads of the memory map
            picked = np.flatnonzero(take)[order]
            block[picked] = self.arrays[s][position[take][order]]
        return block


def _manifest_keys(manifest: Manifest) -> dict[str, int]:
    """Every way an ``image_path`` may name a manifest row: its path as written and its absolute file."""
    keys: dict[str, int] = {}
    for i, p in enumerate(manifest.paths):
        if os.path.normpath(p) in keys:
            raise DeployError(f"{manifest.source}: rows {keys[os.path.normpath(p)]} and {i} are crops of one image ({p}); "
                              "the LAION layout matches rows by image_path alone: import a .npy array instead")
        keys[os.path.normpath(p)] = i
        keys[absolute(resolve(manifest.root, p))] = i
    return keys


def import_embeddings(folder: str | os.PathLike, manifest: Manifest, out: str | os.PathLike, *, dtype: str = "float16",
                      chunk_rows: int | None = None, overwrite: bool = False, space: str | None = None) -> dict[str, Any]:
    """Build a cache from embeddings in the LAION layout, matched to ``manifest`` rows by ``image_path``.

    Any number of shards, rows in any order. Manifest rows with no embedding become invalid rows
    ("no embedding in FOLDER"); embeddings whose path is not in the manifest are counted (``extra``).
    A folder ``export-embeddings`` wrote says which vectors it holds (its marker's ``feature_space``): the
    cache gets that space, so it compares with the caches and runs of the same vectors; ``space`` names it
    for a folder from elsewhere. Returns the cache's attributes plus ``matched``, ``missing``, ``extra``
    and ``non_finite``.
    """
    folder = location(folder)
    with local_dir(folder) as here:
        return _import_embeddings(here, str(folder), manifest, out, dtype, chunk_rows, overwrite, space)


def _import_embeddings(folder: Path, source: str, manifest, out, dtype, chunk_rows, overwrite, space) -> dict[str, Any]:
    """import_embeddings from a local ``folder`` (a copy of ``source`` when that is on an object store)."""
    shards = list_shards(folder)
    keys = _manifest_keys(manifest)
    n = len(manifest)
    shard_of = np.full(n, -1, dtype=np.int64)
    position = np.zeros(n, dtype=np.int64)
    arrays, digest, extra, dim = [], hashlib.sha256(), 0, None
    for s, shard in enumerate(shards):
        try:
            emb = np.load(shard.embeddings, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DeployError(f"{shard.embeddings}: not a .npy array ({type(e).__name__}: {e})") from None
        image_paths = _image_paths(shard.metadata)
        if emb.ndim != 2 or emb.shape[0] != image_paths.num_rows:
            raise DeployError(f"{shard.embeddings}: shape {emb.shape} does not match {image_paths.num_rows} rows of "
                              f"{shard.metadata}")
        if dim is not None and emb.shape[1] != dim:
            raise DeployError(f"{shard.embeddings}: {emb.shape[1]}-d rows, earlier shards hold {dim}-d")
        dim = int(emb.shape[1])
        if emb.dtype.kind not in "fiu":
            raise DeployError(f"{shard.embeddings}: dtype {emb.dtype} is not real numbers")
        for j, path in enumerate(image_paths.column("image_path").to_pylist()):
            if not path:
                raise DeployError(f"{shard.metadata}: row {j} has no image_path")
            key = path if is_url(path) else os.path.abspath(path) if os.path.isabs(path) else os.path.normpath(path)
            i = keys.get(key)
            if i is None:
                extra += 1
                continue
            if shard_of[i] >= 0:
                raise DeployError(f"{shard.metadata}: image_path {path!r} (row {j}) is also in "
                                  f"{shards[shard_of[i]].metadata}")
            shard_of[i], position[i] = s, j
        arrays.append(emb)
        for f in (shard.embeddings, shard.metadata):
            digest.update(f"{f.relative_to(folder)}:{file_sha256(f)}\n".encode())
    missing = shard_of < 0
    meta = import_features(_Gathered(arrays, shard_of, position, dim), manifest, out, source=source,
                           source_sha256=digest.hexdigest(), dtype=dtype, chunk_rows=chunk_rows, overwrite=overwrite,
                           missing=missing, missing_reason=f"no embedding in {source}",
                           space=space or _recorded_space(folder))
    return {**meta, "matched": int(n - missing.sum()), "extra": extra}


def _image_paths(metadata: Path):
    """A shard's ``image_path`` column, checked to be text; one line naming the file otherwise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(metadata)
        if "image_path" not in schema.names:
            raise DeployError(f"{metadata}: no image_path column (it has {', '.join(schema.names) or 'none'})")
        column = schema.field("image_path").type
        if not (pa.types.is_string(column) or pa.types.is_large_string(column)):
            raise DeployError(f"{metadata}: image_path holds {column}, expected text (the images' paths)")
        return pq.read_table(metadata, columns=["image_path"])  # only the column used
    except (OSError, pa.ArrowException) as e:
        raise DeployError(f"{metadata}: not a readable parquet file ({type(e).__name__}: {e})") from None


def _recorded_space(folder: Path) -> dict[str, Any] | None:
    """The feature space ``export-embeddings`` recorded in the folder's marker, if it wrote one."""
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    space = record.get("feature_space") if isinstance(record, dict) else None
    return space if isinstance(space, dict) and space else None

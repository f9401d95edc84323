"""``featcache index`` and ``featcache search``: a collection as a faiss index, searched by image.

An index directory holds
- ``index.faiss``: the rows' embeddings (the run's head, or the raw features), L2-normalised, inner product;
- ``rows.parquet``: per index row, the cache row it came from and its ``path``, ``label``, ``domain``, ``split``;
- ``head.safetensors``: with a run, a copy of the head the rows were embedded with (the index embeds its
  queries with its own copy: retraining or moving the run does not change what the index means);
- ``index.json``: what a query needs to be embedded the same way (the backbone and preprocessing the
  cache recorded, the head's sha256 and the feature spaces of the rows and of the features the head
  takes), the sha256 of each file above (a damaged or swapped file is refused), the index kind and, for
  approximate kinds, their recall@10 against exact search on a sample. The run, cache and root are
  recorded as absolute paths: the index works from any working directory, and moved.

Rows are embedded and added a block at a time, so memory stays bounded whatever the cache's size.
Exact (flat) search is the default; ``ivf`` and ``hnsw`` only on request (measured here: on embeddings like
these they trade a lot of recall for little time; ARCHITECTURE.md, "Measured").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from featcache import __version__
from featcache.cache import FeatureCache, describe_space, feature_space, file_sha256, head_space
from featcache.deploy.embedder import DeployError, Embedder, collection, rebuild_backbone
from featcache.evaluate.search import import_faiss, l2_normalize
from featcache.files import build_dir, check_replaceable, strict_json
from featcache.images import ImageFailure, load_image
from featcache.storage import Remote, absolute, is_url, local_dir, location
from featcache.train.heads import ProjectionHead
from featcache.train.runs import HEAD, apply_head, damage, load_head

INDEX_FILE, ROWS_FILE, META_FILE, HEAD_FILE = "index.faiss", "rows.parquet", "index.json", HEAD
FORMAT_VERSION = 2  # 2: the head is copied into the index, files carry their sha256
MAX_HNSW_M = 256
HASHED_BYTES = 2 << 30  # files up to this size are hashed on every open; larger ones (seconds each) by size
BLOCK_ROWS = 1 << 16
RECALL_QUERIES = 1000
RECALL_K = 10
HNSW_EF_SEARCH = 128


@dataclass
class IndexSpec:
    """Which faiss index: exact (``flat``), ``ivf`` with ``nlist`` lists (``nprobe`` searched), ``hnsw`` with
    ``m`` links per node, or any string of faiss's ``index_factory`` (``factory``: ``IVF65536,PQ32``,
    ``OPQ16_64,IVF262144_HNSW32,PQ16``, ...), compressed indexes for collections that do not fit in memory."""

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    m: int | None = None
    factory: str | None = None

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


def _empty_index(spec: IndexSpec, dim: int):
    faiss = import_faiss()
    if spec.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if spec.kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, spec.nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = spec.nprobe
        return index
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index
    if spec.kind == "factory":
        try:
            index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise DeployError(f"--factory {spec.factory}: faiss cannot build it for {dim}-d vectors ({_faiss_reason(e)})") from None
        ivf = _ivf_of(index)
        if ivf is not None:
            if spec.nprobe is not None and spec.nprobe > ivf.nlist:
                raise DeployError(f"--nprobe {spec.nprobe}: more than the {ivf.nlist} lists of --factory {spec.factory}")
            spec.nlist, spec.nprobe = ivf.nlist, spec.nprobe or max(1, ivf.nlist // 16)
            ivf.nprobe = spec.nprobe
        elif spec.nprobe is not None:
            raise DeployError(f"--nprobe {spec.nprobe}: --factory {spec.factory} has no inverted lists to probe")
        return index
    raise DeployError(f"unknown index kind {spec.kind!r}; expected flat, ivf, hnsw or factory")


def _faiss_reason(e: BaseException) -> str:
    """The readable part of a faiss error (its C++ trace dropped): what failed, and why."""
    text = " ".join(str(e).split())
    for marker in ("failed: ", "Error: "):
        if marker in text:
            return text.split(marker, 1)[1][:160]
    return text[:160]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _ivf_of(index):
    """The inverted-file part of a faiss index (for nprobe), or None."""
    try:
        return import_faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw_links(index) -> int:
    """Bytes of graph links a vector costs in an HNSW index (level 0 holds 2M links, the upper levels about
    1/M of that again, plus its level); 0 for other indexes."""
    hnsw = getattr(import_faiss().downcast_index(index), "hnsw", None)
    return 0 if hnsw is None else int(4 * hnsw.nb_neighbors(0) * 1.1) + 8


def memory_plan(index, spec: IndexSpec, rows: int, dim: int, block_rows: int = BLOCK_ROWS,
                raw_bytes: int = 4) -> dict[str, int]:
    """What building ``index`` over ``rows`` vectors holds in memory, in bytes: the index itself (its codes, the
    ids of inverted lists, graph links, centroids and their graph), the training sample (the cache's rows,
    their embedded and normalised copies, and faiss's own copy while it trains: about 3 float32 copies plus
    the raw ones), and one block of vectors. ``raw_bytes``: a cache row's bytes per dimension."""
    faiss = import_faiss()
    top = index
    while isinstance(faiss.downcast_index(top), faiss.IndexPreTransform):  # OPQ, PCA...: look at what they feed
        top = faiss.downcast_index(top).index
    try:
        per_vector = int(top.sa_code_size())
    except RuntimeError:  # HNSW keeps the vectors (its storage) and its graph
        storage = getattr(faiss.downcast_index(top), "storage", None)
        per_vector = int(storage.sa_code_size()) if storage is not None else 4 * top.d
    per_vector += _hnsw_links(top)
    fixed = 0
    ivf = _ivf_of(index)
    if ivf is not None:
        per_vector += 8  # each inverted list stores its vectors' ids
        fixed += ivf.nlist * dim * 4 + ivf.nlist * _hnsw_links(ivf.quantizer)  # centroids, and their graph if any
    train = training_rows(index, rows)
    return {"index": rows * per_vector + fixed, "training": train * dim * (3 * 4 + raw_bytes),
            "block": block_rows * dim * (2 * 4 + raw_bytes), "per_vector": per_vector, "training_rows": train}


def training_rows(index, rows: int) -> int:
    """Rows an untrained index is trained on: 39 per centroid of its coarse quantizer, at least 10,000 (a
    product quantizer's 256 centroids per sub-vector), at most every row."""
    if index.is_trained:
        return 0
    ivf = _ivf_of(index)
    return min(rows, max(10_000, 39 * (ivf.nlist if ivf is not None else 256)))


def index_spec(ivf: int | None = None, hnsw: int | None = None, nprobe: int | None = None,
               factory: str | None = None) -> IndexSpec:
    if sum(x is not None for x in (ivf, hnsw, factory)) > 1:
        raise DeployError("give one of --ivf, --hnsw and --factory")
    if factory is not None:
        if not factory.strip():
            raise DeployError("--factory '': give a faiss index_factory string, e.g. IVF4096,PQ32")
        return IndexSpec("factory", nprobe=nprobe, factory=factory.strip())
    if nprobe is not None and ivf is None:
        raise DeployError(f"--nprobe {nprobe}: only an IVF index (--ivf NLIST or --factory IVF...) probes lists")
    if ivf is not None:
        if ivf < 1:
            raise DeployError(f"--ivf {ivf}: the number of lists must be at least 1")
        if nprobe is not None and not 1 <= nprobe <= ivf:
            raise DeployError(f"--nprobe {nprobe}: lists searched per query, between 1 and --ivf ({ivf})")
        return IndexSpec("ivf", nlist=ivf, nprobe=nprobe or max(1, ivf // 16))
    if hnsw is not None:
        if not 2 <= hnsw <= MAX_HNSW_M:
            raise DeployError(f"--hnsw {hnsw}: links per node, between 2 and {MAX_HNSW_M}")
        return IndexSpec("hnsw", m=hnsw)
    return IndexSpec()


class _ExactTopK:
    """Exact top-k of a few sample queries over every block added: the ground truth for recall@k."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((len(queries), 0), dtype=np.int64)

    def add(self, block: np.ndarray, first_id: int) -> None:
        s = self.queries @ block.T
        ids = np.broadcast_to(np.arange(first_id, first_id + len(block)), s.shape)
        if s.shape[1] > self.k:  # the block's own top k first: sorting whole blocks cost minutes at 10M rows
            part = np.argpartition(-s, self.k - 1, axis=1)[:, : self.k]
            s, ids = np.take_along_axis(s, part, 1), np.take_along_axis(ids, part, 1)
        s, ids = np.concatenate([self.scores, s], axis=1), np.concatenate([self.ids, ids], axis=1)
        keep = np.lexsort((ids, -s), axis=1)[:, : self.k]
        self.scores, self.ids = np.take_along_axis(s, keep, 1), np.take_along_axis(ids, keep, 1)


def build_index(cache_path: str | os.PathLike, out: str | os.PathLike, *, run: str | os.PathLike | None = None,
                spec: IndexSpec | None = None, overwrite: bool = False, block_rows: int = BLOCK_ROWS,
                progress: Callable[[int, int], None] | None = None, max_memory: int | None = None,
                on_plan: Callable[[dict[str, int]], None] | None = None) -> dict[str, Any]:
    """Index every valid row of a cache (embedded by ``run``'s head, or raw), filled block by block from the
    cache; returns ``index.json``'s content. ``on_plan`` hears the memory the build will hold before it
    starts; above ``max_memory`` the build is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = spec or IndexSpec()
    out = location(out)
    cache, rows, head_run = collection(cache_path, run)
    head_sha = head_run.head_sha256 if head_run is not None else None  # of the bytes loaded, copied below
    if spec.kind == "ivf" and spec.nlist > len(rows):
        raise DeployError(f"--ivf {spec.nlist}: more lists than rows to index ({len(rows)})")

    def embed(block: np.ndarray) -> np.ndarray:
        return l2_normalize(head_run.embed(block) if head_run is not None else block)

    dim = head_run.head.embed_dim if head_run is not None else cache.dim
    check_replaceable(out, lambda d: (d / META_FILE).is_file(), "an index", overwrite)  # before any work (again under the lock)
    index = _empty_index(spec, dim)
    plan = memory_plan(index, spec, len(rows), dim, block_rows, raw_bytes=np.dtype(cache.meta["dtype"]).itemsize)
    if on_plan is not None:
        on_plan(plan)
    needed = plan["index"] + plan["training"] + plan["block"]
    if max_memory is not None and needed > max_memory:
        raise DeployError(f"the {spec.factory or spec.kind} index of {len(rows):,} rows needs about {_gib(needed)} in memory "
                          f"(index {_gib(plan['index'])}, training sample {_gib(plan['training'])}, a block "
                          f"{_gib(plan['block'])}), more than --max-memory {_gib(max_memory)}; choose a smaller code (e.g. "
                          "--factory IVF65536,PQ16) or raise --max-memory")
    rng = np.random.default_rng(0)
    approximate = spec.kind != "flat"
    sample = np.sort(rng.choice(len(rows), min(RECALL_QUERIES, len(rows)), replace=False)) if approximate else None
    truth = _ExactTopK(embed(cache.features(rows[sample])), min(RECALL_K, len(rows))) if approximate else None
    if not index.is_trained:
        train = np.sort(rng.choice(len(rows), plan["training_rows"], replace=False))
        try:
            index.train(embed(cache.features(rows[train])))
        except RuntimeError as e:
            what = f"--factory {spec.factory}" if spec.factory else f"--{spec.kind} {spec.nlist or spec.m}"
            raise DeployError(f"{what}: training on {len(train):,} rows failed ({_faiss_reason(e)})") from None
    meta: dict[str, Any] = {}

    classes = cache.classes()
    labels = cache.labels()
    schema = pa.schema([("row", pa.int64()), ("path", pa.string()), ("label", pa.string()), ("domain", pa.string()),
                        ("split", pa.string())])

    def build(tmp: Path) -> None:
        with pq.ParquetWriter(tmp / ROWS_FILE, schema) as writer:
            for lo in range(0, len(rows), block_rows):
                part = rows[lo:lo + block_rows]
                block = embed(cache.features(part))
                index.add(block)
                if truth is not None:
                    truth.add(block, lo)
                strings = {name: cache.strings(name, part) for name in ("paths", "domains", "splits")}  # this block's
                writer.write_table(pa.table({
                    "row": pa.array(part, pa.int64()),
                    "path": pa.array(strings["paths"].tolist(), pa.string()),
                    "label": pa.array([str(x) for x in classes[labels[part]]], pa.string()),
                    "domain": pa.array(strings["domains"].tolist(), pa.string()),
                    "split": pa.array(strings["splits"].tolist(), pa.string()),
                }, schema=schema))
                if progress:
                    progress(lo + len(part), len(rows))
        recall = None
        if truth is not None:
            _, found = index.search(truth.queries, truth.k)
            recall = float(np.mean([len(set(a) & set(b)) / truth.k for a, b in zip(found, truth.ids)]))
        import_faiss().write_index(index, str(tmp / INDEX_FILE))
        if head_run is not None:
            (tmp / HEAD_FILE).write_bytes(head_run.head_bytes)
        features = feature_space(cache.meta)
        written = [name for name in (INDEX_FILE, ROWS_FILE, HEAD_FILE) if (tmp / name).exists()]
        meta.update({
            "featcache_version": __version__,
            "format_version": FORMAT_VERSION,
            "index": spec.describe(),
            "rows": int(len(rows)),
            "dim": int(dim),
            "metric": "inner product of L2-normalised embeddings (cosine)",
            "embeddings": "run" if head_run is not None else "raw",
            # what the rows are, and what a query's features must be to be embedded like them
            "space": head_space(features, head_sha) if head_run is not None else features,
            "features_space": features,
            "head": head_run.head.config() if head_run is not None else None,
            "head_sha256": head_sha,
            "run": absolute(head_run.path, resolve=True) if head_run is not None else None,  # provenance only
            "cache": absolute(cache.path, resolve=True),
            "cache_key": cache.key,
            "root": absolute(cache.meta["root"]),
            "backbone": cache.meta["backbone"],
            "preprocessing": cache.meta["preprocessing"],
            "precision": cache.meta.get("precision"),
            "recall_at_10": recall,
            "recall_sample": len(sample) if sample is not None else None,
            "files": {name: file_sha256(tmp / name) for name in written},
            "sizes": {name: (tmp / name).stat().st_size for name in written},
        })
        (tmp / META_FILE).write_text(strict_json(meta) + "\n")

    build_dir(out, build, record=META_FILE, what="an index", overwrite=overwrite,
              owned=lambda rel: rel in (INDEX_FILE, ROWS_FILE, META_FILE, HEAD_FILE))
    return meta


@dataclass
class Index:
    """An index directory, opened for search."""

    path: Path | Remote
    meta: dict[str, Any]
    faiss_index: Any
    rows: Any  # pyarrow Table: row, path, label, domain, split
    head: ProjectionHead | None = None
    _embedder: Embedder | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Index":
        """Open an index, checking every file against index.json; anything damaged, swapped or of another
        format is one line naming the file. An index on an object store is read through a local copy."""
        where = location(path)
        with local_dir(where) as here:
            index = cls._open(here)
        index.path = where
        return index

    @classmethod
    def _open(cls, path: Path) -> "Index":
        if not (path / META_FILE).is_file():
            raise DeployError(f"{path}: not a featcache index (no {META_FILE}); build one with `featcache index`")
        meta = _read_meta(path / META_FILE)
        for name, digest in meta["files"].items():
            if not (path / name).is_file():
                raise DeployError(f"{path / name}: missing; rebuild the index with `featcache index`")
            size = (path / name).stat().st_size
            if size != meta["sizes"].get(name) or (size <= HASHED_BYTES and file_sha256(path / name) != digest):
                raise DeployError(f"{path / name}: not the file this index was built with (its size or sha256 differs "
                                  f"from {META_FILE}'s); rebuild the index with `featcache index`")
        rows = _read_rows(path / ROWS_FILE)
        faiss = import_faiss()
        try:  # memory-mapped: a large index is paged in as it is searched, not read whole
            index = faiss.read_index(str(path / INDEX_FILE), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except Exception as mapped:  # a kind faiss cannot map: read it whole; a damaged file fails both ways
            try:
                index = faiss.read_index(str(path / INDEX_FILE))
            except Exception as e:  # faiss reports a damaged file as a RuntimeError with a C++ trace
                raise DeployError(f"{path / INDEX_FILE}: not a readable faiss index ({_faiss_reason(e)}; "
                                  f"memory-mapped: {_faiss_reason(mapped)})") from None
        if index.ntotal != meta["rows"] or rows.num_rows != meta["rows"] or index.d != meta["dim"]:
            raise DeployError(f"{path}: {INDEX_FILE} holds {index.ntotal} rows of {index.d} dims, {ROWS_FILE} "
                              f"{rows.num_rows} rows, {META_FILE} says {meta['rows']} of {meta['dim']}")
        if "nprobe" in meta["index"]:
            if _ivf_of(index) is None:
                raise DeployError(f"{path / INDEX_FILE}: {META_FILE} gives it lists to probe, but it has none; rebuild it")
            _ivf_of(index).nprobe = meta["index"]["nprobe"]
        hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = HNSW_EF_SEARCH
        head = None
        if meta["head"] is not None:
            try:
                head = load_head((path / HEAD_FILE).read_bytes(), meta["head"])
            except Exception as e:  # safetensors and torch report a damaged file in their own ways
                raise DeployError(f"{path / HEAD_FILE}: not the head recorded in {META_FILE} ({damage(e)})") from None
        return cls(path, meta, index, rows, head)

    def embed_features(self, features: np.ndarray) -> np.ndarray:
        """Backbone features of the index's feature space -> L2-normalised vectors like the index's rows."""
        return l2_normalize(features if self.head is None else apply_head(self.head, features, str(self.path)))

    def embedder(self, weights=None, device: str = "cpu") -> Embedder:
        """The backbone (rebuilt as the index recorded it) and the run's head: queries embedded like the rows."""
        if self._embedder is None:
            backbone = rebuild_backbone(self.meta, weights, device)
            head = self.head.to(device).eval() if self.head is not None else None
            self._embedder = Embedder(backbone, head, None, self.meta, device)
        return self._embedder

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of the top ``k`` rows for L2-normalised queries (N, dim), best first."""
        if queries.shape[1] != self.meta["dim"]:
            raise DeployError(f"queries are {queries.shape[1]}-d, the index holds {self.meta['dim']}-d embeddings")
        return self.faiss_index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.meta["rows"]))

    def neighbours(self, scores: np.ndarray, positions: np.ndarray) -> list[list[dict[str, Any]]]:
        """Per query (rows of ``scores`` and ``positions``, best first), its neighbours' path, label and
        score; faiss's -1 ("no more rows") dropped. One lookup in the rows table for the whole block."""
        found = positions >= 0
        picked = self.rows.take(positions[found]).select(["path", "label", "domain"]).to_pydict()
        paths = path_resolver(self.meta["root"])(picked["path"])
        return _per_query(found, scores, paths, picked["label"], picked["domain"])


def _per_query(found: np.ndarray, scores: np.ndarray, paths: list, labels, domains) -> list[list[dict[str, Any]]]:
    """Per query, the neighbours ``found`` (a (Q, k) mask) with their ``scores``, given the path, label and domain
    of every found neighbour in query order."""
    out, at = [], 0
    for q in range(len(found)):
        out.append([{"path": paths[at + j], "label": str(labels[at + j]), "domain": str(domains[at + j]), "score": float(s)}
                    for j, s in enumerate(scores[q][found[q]])])
        at += int(found[q].sum())
    return out


def path_resolver(root: str) -> Callable[[list[str]], list[str]]:
    """Manifest paths to file paths (``manifest.resolve``'s rule, with string joins: a search maps
    thousands of neighbours a block)."""
    if is_url(root):
        return lambda paths: [p if is_url(p) or os.path.isabs(p) else f"{root.rstrip('/')}/{p}" for p in paths]
    root = str(Path(root))
    if root == ".":  # as pathlib writes it: Path(".") / "a.jpg" is "a.jpg"
        return list
    return lambda paths: [p if os.path.isabs(p) else os.path.join(root, p) for p in paths]


def search_images(index: Index, images: list[str | os.PathLike], *, k: int = 10, weights=None, device: str = "cpu",
                  model: str | os.PathLike | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Neighbours of each image file; images that cannot be read are skipped and named in the second list.
    With ``model`` (a file written by ``featcache export``), queries are embedded by that module instead
    of the rebuilt backbone and head."""
    embed = module_embedder(index, model) if model is not None else index.embedder(weights, device).embed_images
    results, failures = [], []
    for path in images:
        try:
            image = load_image(path)
        except ImageFailure as e:
            failures.append(f"{path}: {e}")
            continue
        scores, positions = index.search(embed([image]), k)
        results.append({"query": str(path), "neighbours": index.neighbours(scores, positions)[0]})
    return results, failures


def module_embedder(index: Index, model: str | os.PathLike) -> Callable[[list], np.ndarray]:
    import torch

    from featcache.deploy.export import image_tensor, load_torchscript, read_export_metadata

    meta = read_export_metadata(model)
    if meta.get("space") != index.meta["space"]:
        built = f"run {index.meta['run']}" if index.meta["run"] else "raw features, no head"
        raise DeployError(f"--model {model} embeds into {describe_space(meta.get('space') or {})} (run "
                          f"{meta.get('run')}), but {index.path} holds {describe_space(index.meta['space'])} ({built}): "
                          "its neighbours would be wrong; export the run the index was built with, or rebuild the index")
    module = load_torchscript(model)

    def embed(images: list) -> np.ndarray:
        """The module takes images of one size at a time (it resizes inside): one pass per size."""
        out: np.ndarray | None = None
        sizes: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            sizes.setdefault(im.size, []).append(i)
        with torch.inference_mode():
            for at in sizes.values():
                got = module(image_tensor([images[i] for i in at])).float().numpy()
                out = np.empty((len(images), got.shape[1]), dtype=np.float32) if out is None else out
                out[at] = got
        return out

    return embed


def search_cache(index: Index, query_cache: str | os.PathLike, *, k: int = 10,
                 block_rows: int = BLOCK_ROWS) -> list[dict[str, Any]]:
    """Neighbours of every valid row of another cache. Its vectors must be of the index's feature space
    (embedded here by the index's head) or already of the index's own space (e.g. a run's embeddings
    exported and imported elsewhere: used as they are)."""
    cache = FeatureCache.open(query_cache)
    cache.require_complete()
    space = feature_space(cache.meta)
    if space == index.meta["space"]:
        embed = l2_normalize
    elif space == index.meta["features_space"]:
        embed = index.embed_features
    else:
        raise DeployError(f"--query-cache {cache.path}: holds {describe_space(space)}, the index {index.path} "
                          f"{describe_space(index.meta['space'])}: they cannot be compared")
    rows = np.flatnonzero(cache.valid())
    paths = cache.strings("paths")
    to_file = path_resolver(cache.meta["root"])
    results = []
    for lo in range(0, len(rows), block_rows):
        scores, positions = index.search(embed(cache.features(rows[lo:lo + block_rows])), k)
        queries = to_file(paths[rows[lo:lo + block_rows]].tolist())
        for q, found in zip(queries, index.neighbours(scores, positions)):
            results.append({"query": q, "neighbours": found})
    return results


def search_caches(query_cache: str | os.PathLike, index_caches: list, *, run: str | os.PathLike | None = None,
                  zero_shot: str = "raw", k: int = 10, max_memory: int = 2 << 30) -> list[dict[str, Any]]:
    """Neighbours of every valid row of ``query_cache`` among the valid rows of ``index_caches`` (searched one
    after the other), by exact search streamed from the caches block by block: no index is built, and memory
    holds the queries, their top k and one block whatever the caches' size (nothing is held per index row:
    the neighbours' paths, labels and domains are read for them alone). With ``run``, both sides are that
    run's head embeddings; without, ``zero_shot``: the caches' vectors as they are (``raw``, L2-normalised) or
    averaged to 64 dims (``pooled``, eval's baseline)."""
    from featcache.evaluate.protocols import (
        EvalError, block_rows_for, check_comparable, check_run_fits, embed, rows_at, valid_blocks,
    )
    from featcache.evaluate.search import search_blocks
    from featcache.train.runs import Run

    queries, caches = FeatureCache.open(query_cache), [FeatureCache.open(c) for c in index_caches]
    for cache in [queries, *caches]:
        cache.require_complete()
    check_comparable(queries, caches)
    run = Run.load(run) if run is not None else None
    for cache in [queries, *caches] if run is not None else ():
        check_run_fits(run, cache)

    def embedded(raw: np.ndarray) -> np.ndarray:
        return l2_normalize(embed(raw, run, None if run is not None else zero_shot))

    query_rows = np.flatnonzero(queries.valid())
    if not len(query_rows):
        raise EvalError(f"--query-cache {queries.path}: no valid rows to search with")
    parts = [(cache, int(cache.valid().sum())) for cache in caches]
    total = sum(n for _, n in parts)
    if not total:
        raise EvalError("the index set is empty (no valid rows in the --index-cache caches)")
    block_rows = block_rows_for(max_memory, caches)

    xq = embedded(queries.features(query_rows))
    blocks = valid_blocks(parts, block_rows, lambda cache, rows: embedded(cache.features(rows)))
    scores, positions = search_blocks(xq, blocks, min(k, total), self_ids=np.full(len(xq), -1),
                                      max_memory=max_memory // 2, total=total)
    flat = positions.ravel()
    paths, labels, domains = (np.empty(flat.size, dtype=object) for _ in range(3))
    for cache, rows, here in rows_at(parts, flat, block_rows):
        unique, back = np.unique(rows, return_inverse=True)  # each neighbour row read once, in row order
        paths[here] = np.asarray(path_resolver(cache.meta["root"])(cache.strings("paths", unique).tolist()), dtype=object)[back]
        labels[here] = cache.classes()[cache.labels(unique)][back]
        domains[here] = cache.strings("domains", unique)[back]
    named = path_resolver(queries.meta["root"])(queries.strings("paths", query_rows).tolist())
    found = np.ones(positions.shape, dtype=bool)
    return [{"query": q, "neighbours": n} for q, n in zip(named, _per_query(found, scores, paths, labels, domains))]


META_SHAPE = {"format_version": int, "index": dict, "rows": int, "dim": int, "space": dict, "features_space": dict,
              "head": (dict, type(None)), "files": dict, "sizes": dict, "root": str, "backbone": dict, "preprocessing": dict,
              "cache_key": str}


def _read_meta(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise DeployError(f"{file}: not readable as an index's record ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise DeployError(f"{file}: not an index's record (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DeployError(f"{file.parent}: index format {meta.get('format_version')!r}, this featcache reads "
                          f"{FORMAT_VERSION}; rebuild it with `featcache index`")
    for key, kind in META_SHAPE.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise DeployError(f"{file}: damaged ({key} = {str(meta.get(key))[:60]!r})")
    if meta["index"].get("kind") not in ("flat", "ivf", "hnsw", "factory") or not all(
            isinstance(v, str) and k in (INDEX_FILE, ROWS_FILE, HEAD_FILE) for k, v in meta["files"].items()) \
            or {INDEX_FILE, ROWS_FILE} - set(meta["files"]) or (meta["head"] is not None) != (HEAD_FILE in meta["files"]):
        raise DeployError(f"{file}: damaged (index kind or file list)")
    return meta


def _read_rows(file: Path):
    """rows.parquet, with every column present, of text, and without nulls."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(file)
    except (OSError, pa.ArrowException) as e:
        raise DeployError(f"{file}: not readable ({type(e).__name__})") from None
    for name in ("path", "label", "domain", "split"):
        if name not in rows.column_names or not pa.types.is_string(rows.schema.field(name).type):
            raise DeployError(f"{file}: no text column {name!r}")
        if rows.column(name).null_count:
            raise DeployError(f"{file}: {rows.column(name).null_count} rows have no {name}")
    return rows

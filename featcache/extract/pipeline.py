"""Stage one: run a frozen backbone once over a manifest and write its features into a cache.

Work is split by whole chunks (chunk k holds rows k*C .. (k+1)*C): the chunks not yet done are cut into W
contiguous runs, one per rank, so that neighbouring rows (a WebDataset shard's) stay with one rank. A rank decodes
its rows in DataLoader workers (with ``--views``, each row's augmented views too: ``augment.py``), runs
the model, fills a chunk buffer, and hands each finished chunk to a writer thread that writes
``features``/``valid``/``failures`` (and ``augmented``, with views) for exactly that chunk, fsyncs it,
and only then sets ``chunk_done[k]``. Running the same command again redoes every chunk not flagged done.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from featcache.cache import (
    CacheError,
    FeatureCache,
    StoreWriter,
    build_meta,
    check_cache_out,
    create_store,
    default_rows_per_chunk,
    is_cache,
    key_differences,
    mark_complete,
    remove_partial_files,
)
from featcache.extract.augment import Augmentation, ViewTransform
from featcache.extract.backbones import Backbone
from featcache.files import OutputError, exclusive
from featcache.images import ImageFailure, load_image, load_image_bytes
from featcache.manifest import Manifest, resolve
from featcache.manifest.webdataset import parse_sample, read_samples
from featcache.storage import StorageError, location, same_place

MAX_PENDING_WRITES = 4


def prepared(row: int, decode: Callable[[], Any], transform: Callable, views: ViewTransform | None):
    """(row, images (1 + V, C, H, W) or None, failure reason) of one row: ``decode()`` gives its image, then
    the eval view and, with ``views``, its V augmented views. A bad image is a reason, never an error."""
    stage = "preprocessing"
    try:
        decoded = decode()
        image = transform(decoded).unsqueeze(0)
        if views is not None:
            stage = "augmented views"
            image = torch.cat([image, views(decoded, row)])
        return row, image, ""
    except ImageFailure as e:
        return row, None, str(e)
    except StorageError:  # the store refused or is unreachable: a fault of the run, not of this image
        raise
    except Exception as e:  # a transform that chokes on an odd image must not stop the run
        return row, None, f"{stage} error: {type(e).__name__}: {e}"


class ImageRows(Dataset):
    """Manifest rows that are image files to (row, images, failure reason) (see ``prepared``)."""

    def __init__(self, manifest: Manifest, rows: np.ndarray, transform: Callable, views: ViewTransform | None = None):
        self.files = [str(manifest.resolve(i)) for i in rows]
        self.boxes = [manifest.box(i) for i in rows]
        self.rows = rows
        self.transform = transform
        self.views = views

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        return prepared(int(self.rows[j]), lambda: load_image(self.files[j], self.boxes[j]), self.transform, self.views)


class ShardSamples(IterableDataset):
    """Manifest rows that are WebDataset samples (``SHARD#KEY``) to (row, images, failure reason): each shard
    is read front to back, as a stream (no seeking inside a tar), and its wanted samples are decoded as they
    pass. Decoding workers share the shards (worker i takes every W-th); with fewer shards than workers, every
    worker streams every shard and decodes every W-th of its samples, so decoding still runs on W processes
    (the shards are then read W times: from a page cache, not from the disk). A sample the shard does not
    hold, or an unreadable shard, is a failure row with its reason."""

    def __init__(self, manifest: Manifest, rows: np.ndarray, transform: Callable, views: ViewTransform | None = None):
        self.shards: dict[str, dict[str, list[tuple[int, Any]]]] = {}  # shard file -> key -> [(row, box)]
        for i in rows:
            shard, key = parse_sample(manifest.paths[i])
            self.shards.setdefault(str(resolve(manifest.root, shard)), {}).setdefault(key, []).append((int(i), manifest.box(i)))
        self.transform, self.views = transform, views

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        shards = list(self.shards.items())
        if info is not None and info.num_workers <= len(shards):
            shards = shards[info.id::info.num_workers]
        elif info is not None:  # fewer shards than workers: split each shard's samples instead
            shards = [(shard, dict(list(wanted.items())[info.id::info.num_workers])) for shard, wanted in shards]
        for shard, wanted in shards:
            if wanted:
                yield from self._read(shard, wanted)

    def _read(self, shard: str, wanted: dict[str, list[tuple[int, Any]]]):
        for key, data, problem in read_samples(shard, set(wanted)):
            for row, box in wanted[key]:
                if data is None:
                    yield row, None, problem
                else:
                    yield prepared(row, lambda box=box: load_image_bytes(data, box), self.transform, self.views)


def collate_rows(items):
    rows = torch.tensor([r for r, _, _ in items], dtype=torch.int64)
    ok = [i for i, (_, img, _) in enumerate(items) if img is not None]
    images = torch.cat([items[i][1] for i in ok]) if ok else None  # (ok rows x (1 + V), C, H, W)
    reasons = [reason for _, _, reason in items]
    return rows, images, torch.tensor(ok, dtype=torch.int64), reasons


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def coordinator(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def local_device(self, device: str) -> str:
        """The device this rank runs on: under torchrun with GPUs, its own (cuda:LOCAL_RANK)."""
        if self.world > 1 and device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        return device

    def init(self, device: str) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            # Ranks can finish hours apart on uneven shares; the final barrier must wait for them.
            torch.distributed.init_process_group(backend, timeout=_dt.timedelta(days=7))

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def share(self, obj: Any) -> Any:
        """The coordinator's value of ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass
class Progress:
    """What the caller's progress display needs; ``update`` is called after every batch."""

    total: int = 0
    done: int = 0
    failed: int = 0
    update: Callable[["Progress"], None] = field(default=lambda p: None)


@dataclass
class ExtractResult:
    path: Path
    meta: dict[str, Any]
    rows: int
    rows_this_run: int
    seconds: float
    write_seconds: float
    skipped: bool  # the store was already complete


def prepare_store(out: Path, manifest: Manifest, meta: dict[str, Any], overwrite: bool,
                  retry_failed: bool = False) -> dict[str, Any]:
    """Coordinator: create the store, or check that the one there is the same cache and clean it up.

    The root the images are read from is not in the cache key (it does not change the numbers of an
    image that was read) but it decides which files are read: a resume from another root is refused,
    unless ``retry_failed``, which reads every failed row again (from the new root, or after the user
    fixed the files) by redoing the chunks that hold one.
    """
    if not overwrite and is_cache(out):
        existing = FeatureCache.open(out, mode="r")
        if existing.key != meta["key"]:
            diffs = "; ".join(key_differences(existing.meta, meta))
            raise CacheError(
                f"{out} holds a different cache ({diffs}); pass --overwrite to replace it, or --out to write elsewhere"
            )
        old_root, new_root = existing.meta.get("root"), meta["root"]
        moved = old_root is not None and not same_place(old_root, new_root)
        if moved and not retry_failed:
            raise CacheError(f"{out} was extracted from --root {old_root}, this run reads --root {new_root}: other files. "
                             "Pass --retry-failed to read its failed rows again from the new root, or --overwrite")
        remove_partial_files(out)  # the store's own chunking wins over --chunk-rows on resume
        damaged = sorted({p.chunk for p in existing.chunk_problems(read=True)})
        if retry_failed or damaged:
            return redo_chunks(out, new_root, damaged, retry_failed)
        return dict(existing.meta)
    check_cache_out(out, overwrite)  # only a featcache cache is ever replaced
    create_store(out, manifest, meta)
    return meta


def redo_chunks(out: Path, root: str, damaged: list[int], retry_failed: bool) -> dict[str, Any]:
    """Coordinator: flag as not done (so that this run redoes them) the ``damaged`` chunks and, with
    ``retry_failed``, every chunk holding a failed row; record the root they will be read from."""
    store = StoreWriter(out)
    redo = set(damaged)
    if retry_failed:
        redo |= set((np.flatnonzero(~FeatureCache.open(out).valid()) // store.rows_per_chunk).tolist())
    store.undo(sorted(redo))
    return store.update_attrs(root=root, **({"complete": False} if redo else {}))


def run_extract(
    manifest: Manifest,
    backbone: Backbone,
    out: str | os.PathLike,
    *,
    dtype: str = "float16",
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    chunk_rows: int | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    augmentation: Augmentation | None = None,
    progress: Progress | None = None,
    dist: Dist | None = None,
) -> ExtractResult:
    """Extract features for every row of ``manifest`` not yet done in the store at ``out``; with
    ``augmentation``, also its V augmented views (a batch is then ``max(1, batch_size // (1 + V))`` rows, each
    with its 1 + V images). A row is valid when all of its images give finite embeddings."""
    out = location(out)
    dist = dist or Dist()
    progress = progress or Progress()
    start = time.perf_counter()
    rows_per_chunk = chunk_rows or default_rows_per_chunk(backbone.dim, dtype)
    meta = build_meta(manifest, backbone.describe(), backbone.preprocessing, dtype, precision, rows_per_chunk,
                      augmentation.describe() if augmentation else None)

    status: Any = None
    held = contextlib.ExitStack()  # the coordinator's lock on the store, for the whole run
    if dist.coordinator:
        try:
            held.enter_context(exclusive(out, "a feature cache"))
            meta = prepare_store(out, manifest, meta, overwrite, retry_failed)
        except BaseException as e:  # a lock object is not dropped by the kernel: release it on any failure
            held.close()
            if not isinstance(e, (CacheError, OutputError)):
                raise
            status = e
    status = dist.share(status)
    if isinstance(status, Exception):
        raise status
    with held:
        return _extract_into(out, manifest, backbone, dtype, batch_size, workers, device, precision, progress, dist, start)


def _extract_into(out, manifest, backbone, dtype, batch_size, workers, device, precision, progress, dist,
                  start) -> ExtractResult:
    dist.barrier()

    store = StoreWriter(out)
    meta, rows_per_chunk = store.meta, store.rows_per_chunk
    if meta.get("complete"):
        return ExtractResult(out, meta, len(manifest), 0, time.perf_counter() - start, 0.0, True)

    n = len(manifest)
    # The chunks left to do, in W contiguous runs, one per rank: neighbouring chunks hold neighbouring rows (a
    # WebDataset shard spans several), so each shard is streamed by one rank. Every rank splits the
    # coordinator's view of the flags: one read, before any rank writes.
    todo = np.flatnonzero(~dist.share(store.done()))
    mine = todo[dist.rank * len(todo) // dist.world:(dist.rank + 1) * len(todo) // dist.world].tolist()
    rows = np.concatenate([np.arange(k * rows_per_chunk, min(n, (k + 1) * rows_per_chunk)) for k in mine]) if mine \
        else np.zeros(0, dtype=np.int64)
    progress.total = len(rows)
    progress.update(progress)

    augmentation = Augmentation.from_meta(meta.get("augmentation"))
    views = ViewTransform(augmentation, backbone.transform, backbone.preprocessing) if augmentation else None
    writer = ChunkWriter(store, backbone.dim, dtype)
    try:
        if len(rows):
            _extract_rows(manifest, backbone, rows, views, writer, batch_size, workers, device, precision, progress)
    finally:
        writer.close()

    dist.barrier()
    final = {}
    if dist.coordinator:
        final = mark_complete(out)
    final = dist.share(final)
    elapsed = time.perf_counter() - start
    return ExtractResult(out, final, n, int(progress.done), elapsed, writer.seconds, False)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def image_loader(manifest: Manifest, rows: np.ndarray, transform: Callable, batch_size: int, workers: int,
                 device: torch.device, views: ViewTransform | None = None) -> DataLoader:
    """Decoding and preprocessing in ``workers`` processes while the model runs: image files in row order,
    WebDataset samples in their shards' order (rows must be all of one kind: see ``image_loaders``)."""
    samples = len(rows) and parse_sample(manifest.paths[int(rows[0])]) is not None
    dataset = (ShardSamples if samples else ImageRows)(manifest, rows, transform, views)
    if samples:
        workers = min(workers, len(rows))  # a worker with no sample to decode would only start and stop
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_rows,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


def image_loaders(manifest: Manifest, rows: np.ndarray, transform: Callable, batch_size: int, workers: int,
                  device: torch.device, views: ViewTransform | None = None) -> list[DataLoader]:
    """One loader for the rows that are image files and one for the rows that are WebDataset samples."""
    is_sample = np.fromiter((parse_sample(manifest.paths[int(i)]) is not None for i in rows), dtype=bool, count=len(rows))
    return [image_loader(manifest, part, transform, batch_size, workers, device, views)
            for part in (rows[~is_sample], rows[is_sample]) if len(part)]


def _extract_rows(manifest, backbone, rows, views, writer, batch_size, workers, device, precision, progress) -> None:
    dev = torch.device(device)
    per_row = 1 + (views.augmentation.views if views else 0)  # images per row: the eval view and its augmented views
    loaders = image_loaders(manifest, rows, backbone.transform, max(1, batch_size // per_row), workers, dev, views)

    def collect(batch_rows, feats, ok, reasons) -> None:
        feats = None if feats is None else feats.float().cpu().numpy().reshape(len(ok), per_row, -1)
        writer.add(batch_rows.numpy(), feats, ok.numpy(), reasons)
        progress.done += len(batch_rows)
        progress.failed += sum(1 for r in reasons if r)
        progress.update(progress)

    # One batch stays in flight: batch i is launched before batch i-1 is copied back, so a GPU never
    # waits for the host's copy and bookkeeping.
    in_flight = None
    for batch_rows, images, ok, reasons in itertools.chain(*loaders):
        feats = None
        if images is not None:
            with torch.inference_mode(), _autocast(dev, precision):
                feats = backbone(images.to(dev, non_blocking=True))
        if in_flight is not None:
            collect(*in_flight)
        in_flight = (batch_rows, feats, ok, reasons)
    if in_flight is not None:
        collect(*in_flight)


class ChunkWriter:
    """Fills per-chunk buffers and writes each finished chunk from a background thread."""

    def __init__(self, store: StoreWriter, dim: int, dtype: str):
        self.store, self.views = store, store.views
        self.rows_per_chunk, self.n, self.dim, self.dtype = store.rows_per_chunk, store.rows, dim, np.dtype(dtype)
        # chunk -> (features (rows, 1 + V, D): the eval view then the augmented ones, valid, failures, rows left)
        self.buffers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featcache-writer")
        self.pending: deque[Future] = deque()
        self.seconds = 0.0

    def _buffer(self, k: int):
        if k not in self.buffers:
            lo, hi = k * self.rows_per_chunk, min(self.n, (k + 1) * self.rows_per_chunk)
            self.buffers[k] = (
                np.zeros((hi - lo, 1 + self.views, self.dim), dtype=self.dtype),
                np.zeros(hi - lo, dtype=bool),
                np.full(hi - lo, "", dtype=object),
                [hi - lo],
            )
        return self.buffers[k]

    def add(self, rows: np.ndarray, feats: np.ndarray | None, ok: np.ndarray, reasons: list[str]) -> None:
        """``feats``: (len(ok), 1 + V, D) for the rows at positions ``ok``; the others failed with ``reasons``."""
        ok_set = np.zeros(len(rows), dtype=bool)
        ok_set[ok] = True
        if feats is not None:
            with np.errstate(over="ignore"):  # an overflow is what this looks for: the row becomes a failure
                finite_views = np.isfinite(feats.astype(self.dtype)).all(axis=2)  # (rows, 1 + V)
            finite = finite_views.all(axis=1)
        j = 0
        for i, row in enumerate(rows):
            k = int(row) // self.rows_per_chunk
            f, v, why, left = self._buffer(k)
            local = int(row) - k * self.rows_per_chunk
            if ok_set[i]:
                if finite[j]:
                    f[local] = feats[j]
                    v[local] = True
                else:
                    bad = int(np.flatnonzero(~finite_views[j])[0])
                    where = f" of augmented view {bad}" if bad else ""
                    why[local] = f"non-finite embedding{where} (overflows {self.dtype.name}? try --dtype float32)"
                j += 1
            else:
                why[local] = reasons[i]
            left[0] -= 1
            if left[0] == 0:
                self._submit(k)

    def _submit(self, k: int) -> None:
        f, v, why, _ = self.buffers.pop(k)
        while len(self.pending) >= MAX_PENDING_WRITES:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, k, f, v, why))

    def _write(self, k: int, f: np.ndarray, v: np.ndarray, why: np.ndarray) -> None:
        t = time.perf_counter()
        self.store.write_chunk(k, f[:, 0], v, why, f[:, 1:] if self.views else None)
        self.seconds += time.perf_counter() - t

    def close(self) -> None:
        """Wait for every submitted write (also on Ctrl-C, so finished chunks are kept)."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)

"""``featcache manifest check``: find what would go wrong in a long extraction before starting it.

Every image is opened with ``load_image`` (the same reader ``extract`` uses, crop box included) in a
thread pool (Pillow releases the GIL while decoding) and its bytes are hashed; WebDataset samples
(``SHARD#KEY``) are read as ``extract`` reads them, each shard streamed once. Reported: missing
files and files that do not decode (both make ``extract`` record failure rows), rows naming the same
file twice, byte-identical images under different labels, and classes below a minimum size.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from featcache.images import ImageFailure, load_image, load_image_bytes
from featcache.manifest.curate import class_ids
from featcache.manifest.schema import Manifest, ManifestError, read_manifest, resolve, rows_from_manifest
from featcache.manifest.webdataset import parse_sample, read_samples

MISSING = "missing file"
BATCH = 64


@dataclass
class CheckReport:
    manifest: str
    root: str
    rows: int
    classes: int
    domains: dict[str, int]
    min_per_class: int
    decoded: bool
    missing: list[dict] = field(default_factory=list)  # {path, reason}
    undecodable: list[dict] = field(default_factory=list)  # {path, reason}
    duplicate_paths: list[list[str]] = field(default_factory=list)  # rows naming one file
    identical_images: list[dict] = field(default_factory=list)  # {sha256, rows: [{path, domain, label}]}
    identical_same_class: int = 0  # extra copies of an image within one class (harmless, counted)
    small_classes: list[dict] = field(default_factory=list)  # {domain, label, images}

    @property
    def ok(self) -> bool:
        """False when ``extract`` would record failures (missing or undecodable images)."""
        return not self.missing and not self.undecodable

    def to_json(self) -> dict:
        return {"ok": self.ok, **asdict(self)}


def inspect_file(path: Path, box: tuple[float, float, float, float] | None, decode: bool = True) -> tuple[str | None, str | None]:
    """(failure reason or None, sha256 of the bytes or None) for one image."""
    try:
        if decode:
            load_image(path, box)
        elif not path.is_file():
            return MISSING if not path.exists() else "not a regular file", None
        with path.open("rb") as f:  # a local file, or an object (storage.Remote)
            return None, hashlib.file_digest(f, "sha256").hexdigest()
    except ImageFailure as e:
        return str(e), None
    except OSError as e:
        return f"cannot read file: {e.strerror or e}", None


def inspect_sample(data: bytes | None, problem: str, box, decode: bool = True) -> tuple[str | None, str | None]:
    """``inspect_file`` for a WebDataset sample's image bytes (None: the shard does not hold it, ``problem`` says why)."""
    if data is None:
        return (MISSING if problem.startswith(("missing shard", "no image")) else problem), None
    try:
        if decode:
            load_image_bytes(data, box)
    except ImageFailure as e:
        return str(e), None
    return None, hashlib.sha256(data).hexdigest()


def default_workers(workers: int | None) -> int:
    """The threads to open images with: ``workers``, or 2 per CPU core (at most 32) when None or 0."""
    if workers is not None and workers < 0:
        raise ManifestError(f"--workers must be at least 1 (or 0 for the default), got {workers}")
    return workers or min(32, 2 * (os.cpu_count() or 1))


def check_manifest(
    manifest: str | os.PathLike | Manifest,
    root: str | os.PathLike | None = None,
    *,
    min_per_class: int = 2,
    workers: int | None = None,
    decode: bool = True,
    advance: Callable[[int], None] | None = None,
) -> CheckReport:
    """Check every row of ``manifest`` (paths relative to ``root``). ``advance(n)`` is called as n
    more images are done (for a progress bar)."""
    m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest, root)
    rows = rows_from_manifest(m)
    cls, classes = class_ids(rows)
    counts = np.bincount(cls, minlength=len(classes))
    domains: dict[str, int] = {}
    for d in m.domains:
        domains[d] = domains.get(d, 0) + 1
    report = CheckReport(str(m.source), str(m.root), len(m), len(classes), dict(sorted(domains.items())), min_per_class, decode)

    files = [m.resolve(i) for i in range(len(m))]
    by_norm: dict[tuple, list[int]] = {}
    for i, f in enumerate(files):  # crops of one image (rows with other boxes) are not duplicates
        by_norm.setdefault((os.path.normpath(str(f)), m.box(i)), []).append(i)
    report.duplicate_paths = [[m.paths[i] for i in group] for group in by_norm.values() if len(group) > 1]

    reasons: list[str | None] = [None] * len(m)
    digests: list[str | None] = [None] * len(m)
    shards: dict[Path, dict[str, list[int]]] = {}  # WebDataset samples: shard -> key -> rows
    loose = []
    for i in range(len(m)):
        sample = parse_sample(m.paths[i])
        if sample is None:
            loose.append(i)
        else:
            shards.setdefault(resolve(m.root, sample[0]), {}).setdefault(sample[1], []).append(i)

    def run_batch(start: int) -> int:
        batch = loose[start:start + BATCH]
        for i in batch:
            reasons[i], digests[i] = inspect_file(files[i], m.box(i), decode)
        return len(batch)

    def run_shard(shard: Path, wanted: dict[str, list[int]]) -> int:
        for key, data, problem in read_samples(shard, set(wanted)):
            for i in wanted[key]:
                reasons[i], digests[i] = inspect_sample(data, problem, m.box(i), decode)
        return sum(map(len, wanted.values()))

    workers = default_workers(workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = [pool.submit(run_batch, s) for s in range(0, len(loose), BATCH)]
        jobs += [pool.submit(run_shard, shard, wanted) for shard, wanted in shards.items()]
        for fut in as_completed(jobs):
            n = fut.result()
            if advance:
                advance(n)

    for i, reason in enumerate(reasons):
        if reason is not None:
            (report.missing if reason == MISSING else report.undecodable).append({"path": m.paths[i], "reason": reason})

    by_digest: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        if d is not None:
            by_digest.setdefault(d, []).append(i)
    for digest, group in by_digest.items():
        if len(group) < 2:
            continue
        if len({int(cls[i]) for i in group}) > 1:
            report.identical_images.append(
                {"sha256": digest, "rows": [{"path": m.paths[i], "domain": m.domains[i], "label": m.labels[i]} for i in group]}
            )
        else:
            report.identical_same_class += len(group) - 1

    small = np.flatnonzero(counts < min_per_class)
    report.small_classes = [{"domain": classes[c][0], "label": classes[c][1], "images": int(counts[c])} for c in small]
    return report

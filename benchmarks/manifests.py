"""Time `featcache manifest build gldv2` and the GLDv2 curation rule on a synthetic full-size GLDv2.

A 4.1M-row ``train.csv`` (``id,url,landmark_id``: 16-hex-char ids, ~200k landmarks with a long-tailed
size distribution, a fake url) is written to a temporary folder, then timed:

  build          read train.csv, derive train/a/b/c/<id>.jpg paths, prefix labels (``build gldv2``)
  write          write the 4.1M-row manifest CSV
  curate         the M4D-35k GLDv2 rule in memory: >= 3 images, 10,000 classes, <= 10 each (``recipe``)
  write curated  write the curated manifest
  total          the four above

and, separately, ``read manifest``: reading the 4.1M-row CSV back with ``read_manifest``, which is
what ``featcache manifest curate gldv2.csv ...`` adds when curating from a file instead of in memory.

    uv run python benchmarks/manifests.py
    FEATCACHE_BENCH_ROWS=100000 FEATCACHE_BENCH_CLASSES=5000 uv run python benchmarks/manifests.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featcache.manifest.builders import build  # noqa: E402
from featcache.manifest.curate import Rule, curate, domain_counts, read_inputs  # noqa: E402

ROWS = int(os.environ.get("FEATCACHE_BENCH_ROWS", 4_100_000))
CLASSES = int(os.environ.get("FEATCACHE_BENCH_CLASSES", 200_000))
GLDV2_RULE = Rule(min_per_class=3, max_per_class=10, max_classes=10_000)


def synthetic_train_csv(path: Path, rows: int, classes: int, seed: int = 0) -> None:
    """GLDv2's train.csv shape: class sizes from a Pareto tail (many landmarks with 1-5 images, a few
    with thousands), ids 16 hex characters, rows in random order."""
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.2, classes) + 1.0
    counts = np.maximum(1, np.floor(weights / weights.sum() * rows)).astype(np.int64)
    counts[np.argmax(counts)] += rows - counts.sum()  # exact total (the largest class absorbs the rest)
    landmark_ids = np.sort(rng.choice(classes * 3 // 2, classes, replace=False))
    labels = np.repeat(landmark_ids, counts)
    rng.shuffle(labels)
    hexes = rng.integers(0, 2**63, rows, dtype=np.int64).astype(">u8").tobytes().hex()
    ids = [hexes[i : i + 16] for i in range(0, 16 * rows, 16)]
    with path.open("w") as f:
        f.write("id,url,landmark_id\n")
        f.writelines(f"{i},http://upload.wikimedia.org/wikipedia/commons/{i[0]}/{i[:2]}/{i}.jpg,{lab}\n"
                     for i, lab in zip(ids, labels.tolist()))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "gldv2").mkdir()
        t = time.perf_counter()
        synthetic_train_csv(tmp / "gldv2" / "train.csv", ROWS, CLASSES)
        print(f"setup: synthetic train.csv, {ROWS:,} rows, {CLASSES:,} landmarks "
              f"({(tmp / 'gldv2' / 'train.csv').stat().st_size / 1e6:.0f} MB): {time.perf_counter() - t:.1f} s")

        times: dict[str, float] = {}

        cpu: dict[str, float] = {}

        def timed(name: str, fn):
            t0, c0 = time.perf_counter(), time.process_time()
            result = fn()
            times[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
            print(f"{name:<14} {times[name]:6.2f} s   (cpu {cpu[name]:6.2f} s)")
            return result

        rows = timed("build", lambda: build("gldv2", tmp / "gldv2"))
        timed("write", lambda: rows.write(tmp / "gldv2.csv"))
        kept = timed("curate", lambda: curate(rows, GLDV2_RULE, seed=42))
        timed("write curated", lambda: kept.write(tmp / "gldv2-10k.csv"))
        total = sum(times.values())
        print(f"{'total':<14} {total:6.2f} s   (cpu {sum(cpu.values()):6.2f} s; goal: under 30 s; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        c = domain_counts(kept)["landmarks"]
        print(f"result: {c.classes:,} classes, {c.images:,} images (M4D-35k published: 10,000 classes, 79,166 images)")

        t0, c0 = time.perf_counter(), time.process_time()
        again = read_inputs([tmp / "gldv2.csv"])
        read_s, read_cpu = time.perf_counter() - t0, time.process_time() - c0
        same = curate(again, GLDV2_RULE, seed=42).paths == kept.paths
        print(f"read manifest  {read_s:6.2f} s   (cpu {read_cpu:6.2f} s; read_manifest of the {len(again):,}-row CSV: "
              f"what `manifest curate FILE` adds; same curated rows from the file: {same})")


if __name__ == "__main__":
    main()

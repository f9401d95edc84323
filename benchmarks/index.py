"""`featcache index` + `featcache search --query-cache` against faiss alone, on the same arrays, in one run.

N rows x D dims (clustered random vectors, float32) are written into a feature cache, and Q query rows
into a second one. Then, each phase with its own peak-RSS count:

  faiss alone  L2-normalise the in-memory array, IndexFlatIP.add, search the Q queries (top k)
  featcache    build_index(cache) (reads the cache a block at a time, normalises, adds), Index.open,
               search_cache(query cache) (reads, normalises, searches, maps ids to rows' paths and labels)

The figure is featcache's overhead over faiss: seconds and peak RSS, as ratios. Both return the same
neighbours (checked). Then what opening an index costs: ``Index.open`` (which checks every file against
the sha256 and size index.json recorded) against ``faiss.read_index`` alone, interleaved, medians.

    uv run python benchmarks/index.py                      # 1,000,000 x 64, 10,000 queries
    uv run python benchmarks/index.py --rows 100000 --queries 1000
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_facts, peak_rss_bytes, reset_peak_rss  # noqa: E402  (benchmarks/machine.py)

from featcache.cache import import_features  # noqa: E402
from featcache.deploy.index import Index, build_index, search_cache  # noqa: E402
from featcache.manifest import read_manifest, write_manifest  # noqa: E402


def clustered(n: int, dim: int, clusters: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    return centres[labels] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32), labels


def write_cache(folder: Path, name: str, x: np.ndarray, labels: np.ndarray) -> Path:
    m = write_manifest(folder / f"{name}.csv", [f"{name}/{i:07d}.jpg" for i in range(len(x))], [str(v) for v in labels])
    out = folder / f"{name}.zarr"
    # one "backbone" for both caches (an import records its source as the backbone): their features compare
    import_features(x, read_manifest(m), out, source="bench.npy", source_sha256="0" * 64, dtype="float32")
    return out


def phase(fn):
    gc.collect()
    reset_peak_rss()
    start_rss = peak_rss_bytes()
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t, peak_rss_bytes() - start_rss


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="faiss threads (default: faiss's own)")
    p.add_argument("--opens", type=int, default=5, help="interleaved opens of the index per side")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    args = p.parse_args(argv)
    import faiss
    import pyarrow.parquet  # noqa: F401  (imported once by any featcache index use: not counted in its phase)

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-index-"))
    xb, lb = clustered(args.rows, args.dim, max(10, args.rows // 100), rng)
    xq, lq = clustered(args.queries, args.dim, max(10, args.rows // 100), rng)
    t = time.perf_counter()
    base_cache, query_cache = write_cache(tmp, "base", xb, lb), write_cache(tmp, "query", xq, lq)
    print(f"setup: caches of {args.rows:,} and {args.queries:,} rows x {args.dim} in {time.perf_counter() - t:.1f} s ({tmp})")

    def faiss_alone():
        b = np.ascontiguousarray(xb)
        faiss.normalize_L2(b)
        q = np.ascontiguousarray(xq)
        faiss.normalize_L2(q)
        index = faiss.IndexFlatIP(args.dim)
        t0 = time.perf_counter()
        index.add(b)
        build = time.perf_counter() - t0
        _, ids = index.search(q, args.k)
        return ids, build

    (ids_faiss, faiss_build), faiss_s, faiss_rss = phase(faiss_alone)
    del xb, xq
    gc.collect()

    def with_featcache():
        t0 = time.perf_counter()
        build_index(base_cache, tmp / "index")
        build = time.perf_counter() - t0
        results = search_cache(Index.open(tmp / "index"), query_cache, k=args.k)
        return results, build

    (results, fc_build), fc_s, fc_rss = phase(with_featcache)
    same = np.mean([[int(n["path"].rsplit("/", 1)[1][:-4]) for n in r["neighbours"]] == row.tolist()
                    for r, row in zip(results, ids_faiss)])
    report = {
        "rows": args.rows, "queries": args.queries, "dim": args.dim, "k": args.k,
        "faiss": {"seconds": round(faiss_s, 2), "build_seconds": round(faiss_build, 2), "peak_rss_mib": round(faiss_rss / 2**20)},
        "featcache": {"seconds": round(fc_s, 2), "build_seconds": round(fc_build, 2), "peak_rss_mib": round(fc_rss / 2**20)},
        "time_ratio": round(fc_s / faiss_s, 3),
        "rss_ratio": round(fc_rss / max(faiss_rss, 1), 3),
        "same_neighbours": float(same),
        "machine": machine_facts("cpu"),
    }
    opens = {"faiss.read_index": [], "Index.open": []}
    for _ in range(args.opens):  # interleaved: the page cache and the neighbours' load treat both alike
        for name, open_it in (("faiss.read_index", lambda: faiss.read_index(str(tmp / "index" / "index.faiss"))),
                              ("Index.open", lambda: Index.open(tmp / "index"))):
            t0 = time.perf_counter()
            open_it()
            opens[name].append(time.perf_counter() - t0)
    report["open_seconds"] = {k: round(float(np.median(v)), 3) for k, v in opens.items()}
    report["open_ratio"] = round(report["open_seconds"]["Index.open"] / report["open_seconds"]["faiss.read_index"], 2)
    print(f"{'':12} {'seconds':>8} {'of it build':>12} {'peak RSS (MiB above start)':>28}")
    for name in ("faiss", "featcache"):
        r = report[name]
        print(f"{name:12} {r['seconds']:8.2f} {r['build_seconds']:12.2f} {r['peak_rss_mib']:28,}")
    print(f"featcache / faiss: time {report['time_ratio']:.2f}x, peak RSS {report['rss_ratio']:.2f}x; "
          f"same neighbours for {same:.4f} of the queries; load avg at end {report['machine']['load_avg_1m']}")
    o = report["open_seconds"]
    print(f"open ({args.opens} interleaved, medians): faiss.read_index {o['faiss.read_index']:.3f} s, Index.open "
          f"{o['Index.open']:.3f} s (files checked against their sha256): {report['open_ratio']:.2f}x")
    if args.json:
        print(json.dumps(report))
    shutil.rmtree(tmp, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()

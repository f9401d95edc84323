"""`featcache index --factory` on a large cache against exact search (faiss flat in memory), in one run.

A synthetic cache of --rows clustered --dim-d unit vectors (float16, written with featcache's import). Then:

  build    `build_index(..., IndexSpec("factory", FACTORY))`: trained on a sample, filled block by block;
           seconds, bytes per vector of the written index.faiss, peak RSS of the build (its own process),
           recall@10 against exact search on 1,000 sampled rows (what index.json reports)
  search   queries/s of --queries rows searched for 10 neighbours: the factory index opened by
           `Index.open` (memory-mapped) against faiss IndexFlatIP holding the same normalised rows

    uv run python benchmarks/factory.py [--rows 10000000] [--dim 64] [--factory IVF4096,PQ16] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import finish, machine_facts  # noqa: E402  (benchmarks/machine.py)
from stream_eval import make_cache, peak_rss_mib  # noqa: E402  (benchmarks/stream_eval.py)


def clustered(rows: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, rows // 100), dim)).astype(np.float32)

    def fill(lo: int, hi: int) -> np.ndarray:
        r = np.random.default_rng(seed + lo)
        x = centres[r.integers(0, len(centres), hi - lo)] + 0.6 * r.normal(size=(hi - lo, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return fill


def child_build(cache: str, out: str, factory: str) -> None:
    from featcache.deploy.index import IndexSpec, build_index

    t = time.perf_counter()
    meta = build_index(cache, out, spec=IndexSpec("factory", factory=factory))
    print(json.dumps({"seconds": time.perf_counter() - t, "recall_at_10": meta["recall_at_10"],
                      "index_bytes": meta["sizes"]["index.faiss"], "rows": meta["rows"],
                      "peak_rss_mib": peak_rss_mib()}))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--factory", default="IVF4096,PQ16")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import faiss

    from featcache.cache import FeatureCache
    from featcache.deploy.index import Index
    from featcache.evaluate.search import l2_normalize

    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-factory-"))
    try:
        t = time.perf_counter()
        cache = make_cache(tmp, "collection", args.rows, args.dim, clustered(args.rows, args.dim),
                           [f"c{i % 1000}" for i in range(args.rows)], "index")
        setup = time.perf_counter() - t
        r = subprocess.run([sys.executable, __file__, "--child", str(cache), str(tmp / "index"), args.factory],
                           capture_output=True, text=True, check=True)
        built = json.loads(r.stdout.strip().splitlines()[-1])
        c = FeatureCache.open(cache)
        rng = np.random.default_rng(1)
        queries = l2_normalize(c.features(np.sort(rng.choice(args.rows, args.queries, replace=False))))
        index = Index.open(tmp / "index")
        t = time.perf_counter()
        index.search(queries, 10)
        factory_qps = args.queries / (time.perf_counter() - t)
        flat = faiss.IndexFlatIP(args.dim)
        for lo in range(0, args.rows, 1 << 20):
            flat.add(l2_normalize(c.features(np.arange(lo, min(args.rows, lo + (1 << 20))))))
        t = time.perf_counter()
        flat.search(queries, 10)
        flat_qps = args.queries / (time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"rows": args.rows, "dim": args.dim, "factory": args.factory, "setup_seconds": round(setup, 1),
              "build": built, "bytes_per_vector": round(built["index_bytes"] / args.rows, 2),
              "flat_bytes_per_vector": 4 * args.dim, "queries": args.queries, "factory_qps": round(factory_qps, 1),
              "flat_qps": round(flat_qps, 1), "machine": machine_facts("cpu")}
    print(f"{args.rows:,} x {args.dim} rows, --factory {args.factory}: built in {built['seconds']:.1f} s (peak RSS "
          f"{built['peak_rss_mib']:,.0f} MiB), {report['bytes_per_vector']} bytes a vector (flat: {4 * args.dim}), "
          f"recall@10 {built['recall_at_10']:.4f}")
    print(f"  search {args.queries:,} queries, k = 10: factory (memory-mapped) {factory_qps:,.0f} q/s, faiss flat in "
          f"memory {flat_qps:,.0f} q/s: {factory_qps / flat_qps:.1f}x")
    return finish(report, args.json)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_build(*sys.argv[2:])
    else:
        main()

"""Exact top-k search at GUIEC size: featcache.evaluate.search.search (faiss IndexFlatIP) against a
plain numpy matmul + argpartition baseline, in the same run, on seeded random unit vectors.

    uv run python benchmarks/eval.py [--queries 5000 --index 200000 --dim 64 --k 5
                                      --max-memory BYTES --repeat 3 --json]

Prints seconds for each (faiss: best of --repeat runs, all runs listed), the ratio numpy / faiss,
the agreement of the two (recall of faiss's ids among numpy's, score difference), and the peak
RSS after each stage (resource.getrusage; ru_maxrss only grows, so faiss runs first).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featcache.evaluate.search import l2_normalize, search  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def numpy_topk(xq: np.ndarray, xb: np.ndarray, k: int, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy exact top-k: matmul per query block, argpartition, then sort the k."""
    nq, n = xq.shape[0], xb.shape[0]
    rows = max(1, block_bytes // (4 * n))
    scores = np.empty((nq, k), np.float32)
    ids = np.empty((nq, k), np.int64)
    for i0 in range(0, nq, rows):
        s = xq[i0 : i0 + rows] @ xb.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, 1)
        order = np.lexsort((part, -ps), axis=1)
        scores[i0 : i0 + rows] = np.take_along_axis(ps, order, 1)
        ids[i0 : i0 + rows] = np.take_along_axis(part, order, 1)
    return scores, ids


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--index", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--max-memory", type=int, default=2 << 30, help="search's bound on temporaries, bytes")
    p.add_argument("--threads", type=int, default=None, help="faiss threads (default: faiss's own)")
    p.add_argument("--repeat", type=int, default=3, help="faiss runs; the best is reported")
    p.add_argument("--numpy-block-bytes", type=int, default=256 << 20, help="numpy score block size, bytes")
    p.add_argument("--skip-numpy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    a = p.parse_args(argv)

    import faiss

    rng = np.random.default_rng(a.seed)
    xq = l2_normalize(rng.standard_normal((a.queries, a.dim), dtype=np.float32))
    xb = l2_normalize(rng.standard_normal((a.index, a.dim), dtype=np.float32))
    rss_data = peak_rss_mib()

    runs = []
    for _ in range(max(1, a.repeat)):
        t = time.perf_counter()
        fs, fi = search(xq, xb, a.k, max_memory=a.max_memory, threads=a.threads)
        runs.append(time.perf_counter() - t)
    t_faiss = min(runs)
    rss_faiss = peak_rss_mib()

    res = {
        "queries": a.queries,
        "index": a.index,
        "dim": a.dim,
        "k": a.k,
        "max_memory": a.max_memory,
        "cpu_count": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads() if a.threads is None else a.threads,
        "load_avg_1m": os.getloadavg()[0],
        "faiss_s": round(t_faiss, 3),
        "faiss_runs_s": [round(x, 3) for x in runs],
        "rss_after_data_mib": round(rss_data, 1),
        "rss_peak_faiss_mib": round(rss_faiss, 1),
    }
    if not a.skip_numpy:
        t = time.perf_counter()
        ns, ni = numpy_topk(xq, xb, a.k, a.numpy_block_bytes)
        t_numpy = time.perf_counter() - t
        recall = float(np.mean([len(np.intersect1d(x, y)) for x, y in zip(fi, ni)]) / a.k)
        res |= {
            "numpy_s": round(t_numpy, 3),
            "numpy_over_faiss": round(t_numpy / t_faiss, 2),
            "recall_same_ids": recall,
            "same_order": float(np.mean((fi == ni).all(axis=1))),
            "max_score_diff": float(np.abs(fs - ns).max()),
            "rss_peak_numpy_mib": round(peak_rss_mib(), 1),
        }

    print(f"exact top-{a.k}: {a.queries} queries x {a.index} index rows x {a.dim} dims, "
          f"{res['faiss_threads']} faiss threads, load {res['load_avg_1m']:.2f}")
    print(f"{'method':<28}{'seconds':>10}{'peak RSS MiB':>15}")
    print(f"{'faiss (search, best of ' + str(len(runs)) + ')':<28}{t_faiss:>10.2f}{rss_faiss:>15.0f}")
    if not a.skip_numpy:
        print(f"{'numpy matmul+argpartition':<28}{res['numpy_s']:>10.2f}{res['rss_peak_numpy_mib']:>15.0f}")
        print(f"numpy / faiss: {res['numpy_over_faiss']:.1f}x   agreement: recall {recall:.4f}, "
              f"same order {res['same_order']:.4f}, max |score diff| {res['max_score_diff']:.2e}")
    print(f"faiss runs: {', '.join(f'{x:.2f}' for x in runs)} s; RSS after data {rss_data:.0f} MiB")
    if a.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()

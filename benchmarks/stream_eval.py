"""Streaming exact evaluation (the index read from its caches block by block) against faiss flat on the same
vectors held in memory, in one run, at two collection sizes.

Synthetic ILIAS-like data, written once with featcache's own import: --queries query rows (one per object
instance: its centre plus noise of the same norm), 5 positives per instance (noise 1.5 times the centre),
and N distractor rows (random unit vectors) in their own cache, all --dim wide, float16. For each N in --sizes, each method runs in a fresh process (so its peak RSS is its
own), methods interleaved:

  stream  featcache: EvalSet.load(query, positives, distractors) with --max-memory, then run_eval
          (protocol ilias, k = --k): every block read from the cache, L2-normalised, searched exactly
  flat    faiss alone: the same rows read into memory, normalised, one IndexFlatIP, search(queries, k)

Both figures include reading the rows from the cache. Printed: seconds, peak RSS (MiB), the mAP@k each
gives (they agree), stream / flat throughput.

    uv run python benchmarks/stream_eval.py [--sizes 2000000,10000000] [--dim 64] [--k 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
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


def make_cache(folder: Path, name: str, n: int, dim: int, fill, labels, split: str) -> Path:
    """A cache of ``n`` rows written block by block from ``fill(lo, hi)`` (never the whole matrix in memory)."""
    from featcache.cache import import_npy
    from featcache.manifest import Manifest

    npy = folder / f"{name}.npy"
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(n, dim))
    for lo in range(0, n, 1 << 20):
        out[lo:lo + (1 << 20)] = fill(lo, min(n, lo + (1 << 20)))
    out.flush()
    del out
    m = Manifest(source=folder / f"{name}.csv", root=folder, paths=[f"{name}{i:09d}.jpg" for i in range(n)],
                 labels=labels, domains=["bench"] * n, splits=[split] * n, boxes=np.full((n, 4), np.nan))
    import_npy(npy, m, folder / f"{name}.zarr", space="benchmark")
    npy.unlink()
    return folder / f"{name}.zarr"


def unit(rng, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(folder: Path, queries: int, sizes: list[int], dim: int) -> dict:
    rng = np.random.default_rng(0)
    centres = unit(rng, queries, dim)
    labels = [f"instance{i}" for i in range(queries)]
    q = make_cache(folder, "queries", queries, dim, lambda lo, hi: centres[lo:hi] + 1.0 * unit(rng, hi - lo, dim),
                   labels, "query")
    positives = np.repeat(np.arange(queries), 5)
    p = make_cache(folder, "positives", len(positives), dim,
                   lambda lo, hi: centres[positives[lo:hi]] + 1.5 * unit(rng, hi - lo, dim),
                   [labels[i] for i in positives], "index")
    distractors = {}
    for n in sizes:
        seeded = np.random.default_rng(n)
        distractors[n] = make_cache(folder, f"d{n}", n, dim, lambda lo, hi: unit(seeded, hi - lo, dim),
                                    ["distractor"] * n, "index")
    return {"queries": q, "positives": p, "distractors": distractors}


def run_stream(q: str, p: str, d: str, k: int, max_memory: int) -> dict:
    from featcache.evaluate.protocols import EvalSet, run_eval

    t = time.perf_counter()
    es = EvalSet.load(query_cache=q, index_cache=p, distractors=[d], max_memory=max_memory)
    result = run_eval(eval_set=es, protocol="ilias", k=k, zero_shot="raw", max_memory=max_memory).result
    return {"seconds": time.perf_counter() - t, "map": result["overall"][f"mAP@{k}"], "streamed": es.streamed,
            "block_rows": es.block_rows}


def run_flat(q: str, p: str, d: str, k: int) -> dict:
    import faiss

    from featcache.cache import FeatureCache
    from featcache.evaluate.metrics import score_ranked
    from featcache.evaluate.search import l2_normalize

    t = time.perf_counter()
    qc, pc, dc = (FeatureCache.open(x) for x in (q, p, d))
    xq = l2_normalize(qc.features())
    index = faiss.IndexFlatIP(qc.dim)
    for cache in (pc, dc):
        for lo in range(0, cache.rows, 1 << 20):
            index.add(l2_normalize(cache.features(np.arange(lo, min(cache.rows, lo + (1 << 20))))))
    t_search = time.perf_counter()
    sims, ids = index.search(xq, k)
    searched = time.perf_counter() - t_search
    labels = pc.classes()[pc.labels()]
    result, _, _ = score_ranked(ids, qc.classes()[qc.labels()], labels, protocol="ilias", sims=sims)
    return {"seconds": time.perf_counter() - t, "search_seconds": searched, "map": result["overall"][f"mAP@{k}"]}


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would include the parent's, kept across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(argv: list[str]) -> None:
    mode, q, p, d, k, max_memory = argv
    out = run_stream(q, p, d, int(k), int(max_memory)) if mode == "stream" else run_flat(q, p, d, int(k))
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2000000,10000000")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--max-memory", type=int, default=1 << 30)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-stream-"))
    try:
        t = time.perf_counter()
        data = build(tmp, args.queries, sizes, args.dim)
        setup = time.perf_counter() - t
        runs: dict = {n: {"stream": [], "flat": []} for n in sizes}
        for _ in range(args.repeat):
            for n in sizes:
                for mode in ("stream", "flat"):  # interleaved: the machine's load treats both alike
                    r = subprocess.run([sys.executable, __file__, "--child", mode, str(data["queries"]),
                                        str(data["positives"]), str(data["distractors"][n]), str(args.k),
                                        str(args.max_memory)], capture_output=True, text=True, check=True)
                    runs[n][mode].append(json.loads(r.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"dim": args.dim, "queries": args.queries, "k": args.k, "max_memory": args.max_memory,
              "setup_seconds": round(setup, 1), "sizes": {}, "machine": machine_facts("cpu")}
    print(f"{args.queries:,} queries, {args.queries * 5:,} positives + N distractors, {args.dim}-d float16 caches, "
          f"k = {args.k}, featcache --max-memory {args.max_memory / 2**30:.1f} GiB; medians of {args.repeat}:")
    for n in sizes:
        med = {mode: {key: float(np.median([r[key] for r in rs])) for key in rs[0] if key not in ("streamed",)}
               for mode, rs in runs[n].items()}
        s, f = med["stream"], med["flat"]
        report["sizes"][n] = {"stream": s, "flat": f, "throughput_ratio": round(f["seconds"] / s["seconds"], 3)}
        print(f"  N = {n:>11,}: stream {s['seconds']:7.1f} s, peak {s['peak_rss_mib']:7,.0f} MiB, mAP {s['map']:.4f} | "
              f"faiss flat in memory {f['seconds']:7.1f} s (search {f['search_seconds']:.1f} s), peak "
              f"{f['peak_rss_mib']:7,.0f} MiB, mAP {f['map']:.4f} | stream / flat throughput {f['seconds'] / s['seconds']:.2f}x")
    return finish(report, args.json)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()

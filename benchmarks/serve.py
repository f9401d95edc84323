"""`featcache serve` under bounded local load, against the same model and search called in-process in batches.

The demo's index (tiny-vit on the digits, built by `featcache demo` in a scratch folder) is served by a
`featcache serve` process on 127.0.0.1. Queries are --images JPEGs of 640x480 (uploaded as multipart, as
the page sends them). In --repeat interleaved rounds:

  in-process   queries/s of decode + embed + search, --batch images at a time, in this process, for --seconds
  c=1, 8, 32   queries/s and each request's latency with that many clients (threads, one keep-alive
               connection each) posting queries back to back for --seconds

The figures are medians over rounds; the ratio is served queries/s over in-process queries/s (goal at
concurrency 32: >= 0.8), and p99 / p50 latency (goal: <= 3).

    uv run python benchmarks/serve.py [--images 64] [--seconds 10] [--repeat 2] [--batch 32] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import make_dataset  # noqa: E402  (benchmarks/extract.py)
from machine import finish, machine_facts  # noqa: E402  (benchmarks/machine.py)

CONCURRENCY = (1, 8, 32)


def multipart(image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n10\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def start_server(index: Path, max_batch: int, options: list[str]) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "featcache", "serve", "--index", str(index), "--port", str(port),
                             "--device", "cpu", "--max-batch", str(max_batch), *options], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start")


def load(port: int, bodies: list[tuple[bytes, str]], clients: int, seconds: float) -> tuple[float, list[float]]:
    """(queries/s, latencies in s) of ``clients`` threads posting back to back for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    start = time.perf_counter()
    stop = start + seconds

    def client(c: int) -> None:
        try:
            ask(c)
        except Exception as e:  # a client that fails fails the run
            failures.append(f"{type(e).__name__}: {e}")

    def ask(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = c
        while time.perf_counter() < stop:
            body, kind = bodies[i % len(bodies)]
            t = time.perf_counter()
            conn.request("POST", "/search", body=body, headers={"Content-Type": kind})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                failures.append(f"{r.status}")
            latencies[c].append(time.perf_counter() - t)
            i += clients
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} requests failed ({sorted(set(failures))[:5]})")
    flat = [x for per in latencies for x in per]
    return len(flat) / elapsed, flat


def in_process(index, images: list[bytes], batch: int, seconds: float) -> float:
    """queries/s of decoding, embedding and searching ``batch`` images at a time, here."""
    from featcache.images import load_image_bytes

    embedder = index.embedder(None, "cpu")
    done, i = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        picked = [images[(i + j) % len(images)] for j in range(batch)]
        index.search(embedder.embed_images([load_image_bytes(b) for b in picked]), 10)
        done += batch
        i += batch
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--serve-option", action="append", default=[], metavar="OPTION",
                   help="Pass this to `featcache serve` (repeatable), e.g. --serve-option=--max-wait-ms=20")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from featcache.deploy.index import Index

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still stop the server (finally below)
    here = os.getcwd()
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-serve-"))
    proc = None
    try:
        os.chdir(tmp)
        subprocess.run([sys.executable, "-m", "featcache", "demo"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        index_dir = tmp / "runs" / "demo" / "index"
        make_dataset(tmp / "queries", args.images, (640, 480), threads=4)
        images = [f.read_bytes() for f in sorted((tmp / "queries" / "images").glob("*.jpg"))]
        bodies = [multipart(b) for b in images]
        index = Index.open(index_dir)
        proc, port = start_server(index_dir, args.batch, args.serve_option)
        load(port, bodies, 8, 2.0)  # warm-up: the first requests build what the model caches
        in_process(index, images, args.batch, 2.0)
        rates: dict[str, list[float]] = {"in-process": [], **{f"c={c}": [] for c in CONCURRENCY}}
        p50: dict[str, list[float]] = {f"c={c}": [] for c in CONCURRENCY}
        p99: dict[str, list[float]] = {f"c={c}": [] for c in CONCURRENCY}
        for r in range(args.repeat):  # interleaved: the machine's load treats both alike
            rates["in-process"].append(in_process(index, images, args.batch, args.seconds))
            for c in CONCURRENCY:
                qps, latencies = load(port, bodies, c, args.seconds)
                rates[f"c={c}"].append(qps)
                p50[f"c={c}"].append(float(np.percentile(latencies, 50)))
                p99[f"c={c}"].append(float(np.percentile(latencies, 99)))
        med = {k: float(np.median(v)) for k, v in rates.items()}
        report = {
            "images": args.images, "seconds": args.seconds, "repeat": args.repeat, "batch": args.batch,
            "serve_options": args.serve_option,
            "queries_per_s": {k: round(v, 1) for k, v in med.items()},
            "ratio_to_in_process": {k: round(med[k] / med["in-process"], 3) for k in med if k != "in-process"},
            "p50_ms": {k: round(1000 * float(np.median(v)), 1) for k, v in p50.items()},
            "p99_ms": {k: round(1000 * float(np.median(v)), 1) for k, v in p99.items()},
            "p99_over_p50": {k: round(float(np.median(p99[k])) / float(np.median(p50[k])), 2) for k in p50},
            "machine": machine_facts("cpu"),
        }
        print(f"in-process, batches of {args.batch}: {med['in-process']:.1f} queries/s")
        for c in CONCURRENCY:
            k = f"c={c}"
            print(f"served {k:5}: {med[k]:6.1f} queries/s ({report['ratio_to_in_process'][k]:.2f}x in-process), "
                  f"p50 {report['p50_ms'][k]} ms, p99 {report['p99_ms'][k]} ms ({report['p99_over_p50'][k]}x p50)")
        return finish(report, args.json)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        os.chdir(here)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

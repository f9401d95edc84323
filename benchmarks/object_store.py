"""A feature cache on an S3 server against the same cache on the local disk, in one run.

An S3 server (moto's, `python -m moto.server`, a separate process on 127.0.0.1: the client and the server
do not share an interpreter) stands in for the object store. In --repeat interleaved rounds:

  write    MB/s of writing a whole cache of --rows x --dim float16 rows (featcache import's writer: every
           chunk, its flag, the attributes; a local store fsyncs each chunk, an object is durable once PUT)
  read     MB/s of the full read train-head does (FeatureCache.features(valid rows), 4 MB chunks; the
           valid mask, read before, is not timed)
  zarr     (s3 only) the same read through zarr's own fsspec reader, which featcache's read replaces there
  GET      (s3 only) the same chunk objects fetched and dropped, 32 at a time: what the server can serve
  extract  images/s of `run_extract` (tiny-vit, local images) into a fresh store, local or s3://

The figures are s3 over local (goal for read: >= 0.5), medians of the rounds.

    uv run python benchmarks/object_store.py [--rows 100000] [--dim 1152] [--images 512] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import make_dataset  # noqa: E402  (benchmarks/extract.py)
from machine import finish, machine_facts  # noqa: E402  (benchmarks/machine.py)


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the S3 server did not start")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--model", default="tiny-vit")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    server, endpoint = start_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    from featcache.cache import FeatureCache, import_features
    from featcache.extract.backbones import create_backbone
    from featcache.extract.pipeline import Progress, run_extract
    from featcache.manifest import read_manifest, write_manifest
    from featcache.storage import Remote, filesystem

    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-s3-"))
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    fs = filesystem("s3")
    fs.mkdir(bucket)
    try:
        rng = np.random.default_rng(0)
        features = rng.normal(size=(args.rows, args.dim)).astype(np.float16)
        mb = features.nbytes / 1e6
        manifest = read_manifest(write_manifest(tmp / "rows.csv", [f"i{i}.jpg" for i in range(args.rows)],
                                                [str(i % 1000) for i in range(args.rows)]))
        make_dataset(tmp / "images", args.images, (640, 480), threads=4)
        images = read_manifest(tmp / "images" / "manifest.csv")
        backbone = create_backbone(args.model)
        places = {"local": lambda name: tmp / name, "s3": lambda name: Remote(f"s3://{bucket}/{name}")}

        def remove(where) -> None:
            if isinstance(where, Remote):
                if where.exists():
                    fs.rm(where.key, recursive=True)
            else:
                shutil.rmtree(where, ignore_errors=True)

        rates: dict[str, list[float]] = {f"{what} {kind}": [] for what in ("write", "read", "extract") for kind in places}
        rates.update({"zarr s3": [], "GET s3": []})
        for r in range(args.repeat):  # interleaved: the machine's load treats both alike
            for kind, place in places.items():
                out = place(f"c{r}.zarr")
                t = time.perf_counter()
                import_features(features, manifest, out, source="bench.npy", source_sha256="0" * 64)
                rates[f"write {kind}"].append(mb / (time.perf_counter() - t))
                cache = FeatureCache.open(out)
                keys = fs.find(f"{out.key}/features/c") if kind == "s3" else []

                valid = cache.valid()

                def read() -> None:
                    got.append(cache.features(valid))

                def read_zarr() -> None:
                    cache.group["features"][:]

                def get() -> None:
                    for lo in range(0, len(keys), 64):
                        fs.cat(keys[lo:lo + 64], batch_size=32)

                reads = [("read", read)] + ([("zarr", read_zarr), ("GET", get)] if kind == "s3" else [])
                got: list[np.ndarray] = []
                for name, fn in reads[r % len(reads):] + reads[:r % len(reads)]:  # each goes first in some round
                    t = time.perf_counter()
                    fn()
                    rates[f"{name} {kind}"].append(mb / (time.perf_counter() - t))
                assert np.array_equal(got.pop(), features)
                remove(out)
                out = place(f"e{r}.zarr")
                t = time.perf_counter()
                result = run_extract(images, backbone, out, batch_size=64, workers=2, device="cpu", precision="fp32",
                                     progress=Progress())
                rates[f"extract {kind}"].append(result.rows_this_run / (time.perf_counter() - t))
                remove(out)
        medians = {k: round(float(np.median(v)), 1) for k, v in rates.items()}
        report = {
            "rows": args.rows, "dim": args.dim, "megabytes": round(mb, 1), "images": args.images, "model": args.model,
            "repeat": args.repeat, "medians": medians,
            "ratios": {what: round(medians[f"{what} s3"] / medians[f"{what} local"], 3)
                       for what in ("write", "read", "extract")},
            "machine": machine_facts("cpu"),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        server.terminate()
        server.wait(timeout=30)
    print(f"cache of {args.rows:,} x {args.dim} float16 ({mb:,.0f} MB) and {args.images} JPEGs 640x480 ({args.model}, "
          f"batch 64, 2 workers); medians of {args.repeat} interleaved rounds; S3 = moto's server on 127.0.0.1:")
    for what, unit in (("write", "MB/s"), ("read", "MB/s"), ("extract", "images/s")):
        lo, s3 = medians[f"{what} local"], medians[f"{what} s3"]
        print(f"  {what:8} local {lo:9,.1f}   s3 {s3:9,.1f} {unit:9}  s3 / local {s3 / lo:.2f}x")
    print(f"  read through zarr's fsspec reader {medians['zarr s3']:,.1f} MB/s; the objects alone (GET, no decoding) "
          f"{medians['GET s3']:,.1f} MB/s: featcache's read is {medians['read s3'] / medians['GET s3']:.2f}x the server's rate")
    return finish(report, args.json)


if __name__ == "__main__":
    main()

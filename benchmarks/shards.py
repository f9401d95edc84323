"""Extraction from WebDataset tar shards against the same images as loose files, in one run.

N synthetic JPEGs (benchmarks/extract.py's) are written once as loose files with a manifest, and once
into tar shards in img2dataset's layout (KEY.jpg + KEY.json, --per-shard samples each) with a manifest
from `featcache manifest build webdataset`. Then, in --repeat interleaved rounds, on the same model,
batch size and workers:

  decode   images/s of the loaders run_extract uses (files: one image per read; shards: each tar streamed)
  extract  images/s of run_extract into a fresh store (decode, model, chunk writes, fsync)

The figures are the shards' rate over the loose files' (goal: >= 1.0), medians of the rounds.

    uv run python benchmarks/shards.py [--images 2048] [--per-shard 256] [--size 640x480] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from extract import make_dataset, parse_size  # noqa: E402  (benchmarks/extract.py)
from machine import finish, machine_facts  # noqa: E402  (benchmarks/machine.py)

from featcache.extract.backbones import create_backbone  # noqa: E402
from featcache.extract.pipeline import Progress, image_loaders, run_extract  # noqa: E402
from featcache.manifest import read_manifest  # noqa: E402
from featcache.manifest.builders import build  # noqa: E402


def write_shards(folder: Path, loose: Path, per_shard: int) -> Path:
    """The loose images as tar shards (KEY.jpg, KEY.json) and their manifest, as the builder lists them."""
    m = read_manifest(loose / "manifest.csv")
    root = folder / "shards"
    root.mkdir()
    for s, lo in enumerate(range(0, len(m), per_shard)):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(lo, min(len(m), lo + per_shard)):
                key = f"{s:05d}{i:06d}"
                for name, data in ((f"{key}.jpg", m.resolve(i).read_bytes()),
                                   (f"{key}.json", json.dumps({"label": m.labels[i]}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return build("webdataset", root, label="label").write(folder / "shards.csv")


def decode_rate(manifest, backbone, batch_size: int, workers: int) -> float:
    rows = np.arange(len(manifest))
    t = time.perf_counter()
    n = 0
    for loader in image_loaders(manifest, rows, backbone.transform, batch_size, workers, torch.device("cpu")):
        for batch_rows, _, _, _ in loader:
            n += len(batch_rows)
    return n / (time.perf_counter() - t)


def extract_rate(manifest, backbone, out: Path, batch_size: int, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    result = run_extract(manifest, backbone, out, batch_size=batch_size, workers=workers, device="cpu",
                         precision="fp32", progress=Progress())
    assert result.rows_this_run == len(manifest)
    return len(manifest) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-vit")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--size", type=parse_size, default=(640, 480))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-shards-"))
    try:
        make_dataset(tmp / "loose", args.images, args.size, threads=4)
        loose = read_manifest(tmp / "loose" / "manifest.csv")
        shards = read_manifest(write_shards(tmp, tmp / "loose", args.per_shard), tmp / "shards")
        backbone = create_backbone(args.model)
        rates = {f"{what} {kind}": [] for what in ("decode", "extract") for kind in ("files", "shards")}
        for _ in range(args.repeat):  # interleaved: the machine's load treats both alike
            for kind, m in (("files", loose), ("shards", shards)):
                rates[f"decode {kind}"].append(decode_rate(m, backbone, args.batch_size, args.workers))
                rates[f"extract {kind}"].append(extract_rate(m, backbone, tmp / f"{kind}.zarr", args.batch_size,
                                                             args.workers))
        medians = {k: round(float(np.median(v)), 1) for k, v in rates.items()}
        report = {
            "images": args.images, "per_shard": args.per_shard, "size": list(args.size), "model": args.model,
            "workers": args.workers, "batch_size": args.batch_size, "repeat": args.repeat, "images_per_s": medians,
            "decode_ratio": round(medians["decode shards"] / medians["decode files"], 3),
            "extract_ratio": round(medians["extract shards"] / medians["extract files"], 3),
            "machine": machine_facts("cpu"),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.images:,} JPEGs {args.size[0]}x{args.size[1]}, {args.per_shard} per shard, model {args.model}, "
          f"batch {args.batch_size}, {args.workers} workers, medians of {args.repeat} interleaved rounds (images/s):")
    for what in ("decode", "extract"):
        f, s = medians[f"{what} files"], medians[f"{what} shards"]
        print(f"  {what:8} files {f:8,.1f}   shards {s:8,.1f}   shards / files {s / f:.2f}x")
    return finish(report, args.json)


if __name__ == "__main__":
    main()

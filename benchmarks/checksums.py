"""What the per-chunk crc32c costs: writing a cache with and without it, and `featcache info --verify`.

One run, interleaved: the same rows (--rows x --dim float16, ~1 GB by default) are written into a Zarr
array chunked like a cache's `features`, once with the crc32c codec featcache uses and once without,
--repeat times each; then the checksummed copy is verified (every chunk read back and checked, what
`info --verify` does) and read plainly from the array without checksums. Reported: the write ratio, the
checksum's cost per row, that cost as a share of one image's end-to-end extraction at the paper's GPU
bound (1,150 img/s for SigLIP SO400M-384 on an H200: its 671 GFLOP per image at the 790 TFLOP/s bf16 an H200 reaches) and at this machine's own rate
(--images synthetic 800x600 JPEGs through tiny-vit, measured here), and the verify speed in GB/s.

    uv run python benchmarks/checksums.py
    uv run python benchmarks/checksums.py --rows 50000      # quicker, ~115 MB
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zarr  # noqa: E402
from machine import machine_facts  # noqa: E402  (benchmarks/machine.py)
from PIL import Image  # noqa: E402
from zarr.codecs import Crc32cCodec  # noqa: E402

from featcache.cache import default_rows_per_chunk  # noqa: E402

GPU_BOUND_IMAGES_PER_S = 1150.0  # 790 TFLOP/s (H200, bf16) / 671 GFLOP per SO400M-384 image (ARCHITECTURE.md)


def write(path: Path, data: np.ndarray, rows_per_chunk: int, checksum: bool) -> float:
    shutil.rmtree(path, ignore_errors=True)
    group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    arr = group.create_array("features", shape=data.shape, chunks=(rows_per_chunk, data.shape[1]), dtype=data.dtype,
                             fill_value=0, compressors=[Crc32cCodec()] if checksum else None,
                             config={"write_empty_chunks": True})
    t = time.perf_counter()
    for lo in range(0, len(data), rows_per_chunk):  # a chunk at a time, as extract's writer does
        arr[lo:lo + rows_per_chunk] = data[lo:lo + rows_per_chunk]
    return time.perf_counter() - t


def read(path: Path, rows_per_chunk: int) -> float:
    arr = zarr.open_group(store=str(path), mode="r", zarr_format=3)["features"]
    t = time.perf_counter()
    for lo in range(0, arr.shape[0], rows_per_chunk):
        arr[lo:lo + rows_per_chunk]
    return time.perf_counter() - t


def extract_rate(folder: Path, images: int) -> float:
    """Images/s of featcache's own extraction (tiny-vit, CPU) on synthetic 800x600 JPEGs."""
    from featcache.extract.backbones import create_backbone
    from featcache.extract.pipeline import run_extract
    from featcache.manifest import read_manifest, write_manifest

    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    names = []
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.jpg", quality=90)
        names.append(f"img/{i}.jpg")
    m = read_manifest(write_manifest(folder / "m.csv", names, ["0"] * images))
    r = run_extract(m, create_backbone("tiny-vit"), folder / "c.zarr", batch_size=32, workers=1)
    return images / r.seconds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=465_000, help="rows of float16 features (465,000 x 1152 is ~1 GB)")
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--images", type=int, default=128, help="JPEGs for this machine's own end-to-end rate")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-crc-"))
    data = np.random.default_rng(0).normal(size=(args.rows, args.dim)).astype(np.float16)
    rpc = default_rows_per_chunk(args.dim, "float16")
    gb = data.nbytes / 1e9
    times = {"plain": [], "crc32c": []}
    for _ in range(args.repeat):  # interleaved
        times["plain"].append(write(tmp / "plain", data, rpc, False))
        times["crc32c"].append(write(tmp / "crc", data, rpc, True))
    med = {k: statistics.median(v) for k, v in times.items()}
    verify = statistics.median(read(tmp / "crc", rpc) for _ in range(args.repeat))
    plain_read = statistics.median(read(tmp / "plain", rpc) for _ in range(args.repeat))
    per_row_us = max(0.0, med["crc32c"] - med["plain"]) / args.rows * 1e6
    here = extract_rate(tmp / "extract", args.images)
    report = {
        "rows": args.rows, "dim": args.dim, "gigabytes": round(gb, 3), "rows_per_chunk": rpc,
        "write_seconds": {k: round(v, 3) for k, v in med.items()},
        "write_ratio": round(med["crc32c"] / med["plain"], 3),
        "checksum_us_per_row": round(per_row_us, 3),
        "share_of_an_image_at_gpu_bound": round(per_row_us * 1e-6 * GPU_BOUND_IMAGES_PER_S, 5),
        "extract_images_per_s_here": round(here, 1),
        "share_of_an_image_here": round(per_row_us * 1e-6 * here, 6),
        "verify_seconds": round(verify, 3), "verify_gb_per_s": round(gb / verify, 2),
        "plain_read_seconds": round(plain_read, 3),
        "machine": machine_facts("cpu"),
    }
    print(f"{args.rows:,} x {args.dim} float16 = {gb:.2f} GB, {rpc} rows per chunk")
    print(f"write  plain {med['plain']:.2f} s, crc32c {med['crc32c']:.2f} s: ratio {report['write_ratio']:.3f} "
          f"(runs {', '.join(f'{x:.2f}' for x in times['plain'])} | {', '.join(f'{x:.2f}' for x in times['crc32c'])})")
    print(f"checksum cost {per_row_us:.2f} us per row: {100 * report['share_of_an_image_at_gpu_bound']:.3f} % of an image "
          f"at {GPU_BOUND_IMAGES_PER_S:,.0f} img/s (goal < 2 %); {100 * report['share_of_an_image_here']:.4f} % at this "
          f"machine's {here:.0f} img/s")
    print(f"info --verify: {verify:.2f} s for {gb:.2f} GB = {report['verify_gb_per_s']:.2f} GB/s "
          f"(plain read without checksums {plain_read:.2f} s); load avg at end {report['machine']['load_avg_1m']}")
    if args.json:
        print(json.dumps(report))
    shutil.rmtree(tmp, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()

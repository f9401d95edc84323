"""Stage one throughput: decoding alone, the model alone, and `run_extract` end to end, in one run.

N synthetic JPEGs (smooth random content, quality 90) and a manifest are written to a temporary folder,
then three figures are measured on the same images, model, batch size, workers and precision, in
--repeat interleaved rounds (the fastest run of each is kept):

  decode-only   images/s of the DataLoader that run_extract uses (ImageRows + collate_rows), no model
  model-only    images/s of the model on batches already in device memory (warm-up first)
  end-to-end    images/s of run_extract into a fresh store (decode, model, chunk writes, fsync)

Every figure is reported against the others measured in the same run (timings on a shared machine are
noisy): end-to-end / model-only (goal on a GPU: >= 0.90), end-to-end / decode-only, and the share of
end-to-end time the writer thread spent writing chunks (write_seconds / seconds; the writer runs in the
background, so this is busy time, not necessarily time the pipeline waited).

    uv run python benchmarks/extract.py [--model tiny-vit] [--images 512] [--size 800x600]
                                        [--batch-size 64] [--workers CORES] [--device cuda|cpu]
                                        [--precision bf16|fp16|fp32] [--repeat 3] [--threads N] [--json]

On an H200, the paper's backbone architecture with random weights (no download needed):

    uv run python benchmarks/extract.py --model open_clip:ViT-SO400M-14-SigLIP-384 --images 4096 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from machine import machine_facts, sync  # noqa: E402  (benchmarks/machine.py)
from PIL import Image  # noqa: E402

from featcache.devices import default_precision  # noqa: E402
from featcache.extract.backbones import create_backbone  # noqa: E402
from featcache.extract.pipeline import Progress, _autocast, image_loader, run_extract  # noqa: E402
from featcache.manifest import read_manifest, write_manifest  # noqa: E402

GOAL_E2E_OVER_MODEL = 0.90


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WxH, e.g. 800x600") from None
    if w < 2 or h < 2:
        raise argparse.ArgumentTypeError(f"--size {text!r}: both sides must be >= 2")
    return w, h


def print_header(title: str, facts: dict) -> None:
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"cwd: {os.getcwd()}")
    print(f"{title}: cpu_count={facts['cpu_count']} ({facts['cpu']}), torch {facts['torch']} "
          f"({facts['torch_threads']} threads), python {facts['python']}, device {facts['device']} "
          f"= {facts['device_name']}, load avg {facts['load_avg_1m']}")


# ------------------------------------------------------------------------------------------ images


def write_jpeg(path: Path, size: tuple[int, int], seed: int) -> None:
    """Smooth random content: coarse noise upsampled (bicubic) plus a little fine grain, quality 90."""
    w, h = size
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    im = Image.fromarray(coarse, "RGB").resize((w, h), Image.BICUBIC)
    grain = rng.integers(-8, 9, (h, w, 3), dtype=np.int16)
    a = np.clip(np.asarray(im, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(a, "RGB").save(path, "JPEG", quality=90)


def make_dataset(folder: Path, n: int, size: tuple[int, int], threads: int) -> Path:
    images = folder / "images"
    images.mkdir(parents=True)
    paths = [f"images/{i:06d}.jpg" for i in range(n)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(lambda i: write_jpeg(folder / paths[i], size, i), range(n)))
    labels = [str(i % max(2, n // 8)) for i in range(n)]
    return write_manifest(folder / "manifest.csv", paths, labels)


# ------------------------------------------------------------------------------------------ measurements


def measure_decode(manifest, backbone, batch_size: int, workers: int, dev: torch.device) -> dict:
    """Iterate the DataLoader (and copy each batch to the device) with no model."""
    t = time.perf_counter()
    loader = image_loader(manifest, np.arange(len(manifest)), backbone.transform, batch_size, workers, dev)
    n, failed, first = 0, 0, None
    for _rows, images, ok, reasons in loader:
        if images is not None:
            images.to(dev, non_blocking=True)
            if first is None:
                first = images.clone()
            n += len(ok)
        failed += sum(1 for r in reasons if r)
    sync(dev)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "images": n, "failed": failed, "images_per_s": n / seconds, "sample": first}


def measure_model(backbone, sample: torch.Tensor, n_images: int, batch_size: int, dev: torch.device,
                  precision: str, warmup: int, min_seconds: float) -> dict:
    """The model alone on batches already on the device, same batch sizes as one pass over N images
    (last batch included), repeated until ``min_seconds``; features copied back to the host as
    run_extract does."""
    reps = math.ceil(batch_size / len(sample))
    full = sample.repeat(reps, 1, 1, 1)[:batch_size].to(dev).contiguous()
    sizes = [batch_size] * (n_images // batch_size) + ([n_images % batch_size] if n_images % batch_size else [])
    batches = {b: full[:b].contiguous() for b in set(sizes)}
    with torch.inference_mode(), _autocast(dev, precision):
        for _ in range(warmup):
            backbone(full).float().cpu()
        sync(dev)
        t = time.perf_counter()
        done, passes = 0, 0
        while True:
            for b in sizes:
                backbone(batches[b]).float().cpu().numpy()
                done += b
            passes += 1
            sync(dev)
            if time.perf_counter() - t >= min_seconds:
                break
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "images": done, "passes": passes, "images_per_s": done / seconds}


def measure_end_to_end(manifest, backbone, out: Path, batch_size: int, workers: int, device: str,
                       precision: str, dtype: str) -> dict:
    sync(torch.device(device))
    progress = Progress()
    r = run_extract(manifest, backbone, out, dtype=dtype, batch_size=batch_size, workers=workers, device=device,
                    precision=precision, overwrite=True, progress=progress)
    return {
        "seconds": r.seconds,
        "write_seconds": r.write_seconds,
        "images": r.rows_this_run - progress.failed,
        "failed": progress.failed,
        "rows_per_chunk": r.meta.get("rows_per_chunk"),
        "images_per_s": (r.rows_this_run - progress.failed) / r.seconds,
    }


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-vit", help="registry name, open_clip:ARCH[@TAG] or timm:NAME")
    p.add_argument("--weights", default=None, help="local weights file for --model")
    p.add_argument("--images", type=int, default=512, help="synthetic JPEGs to generate (N)")
    p.add_argument("--size", type=parse_size, default=(800, 600), help="image size WxH (default 800x600)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (featcache extract's default)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader processes (default: cpu count)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast precision (default: bf16 on cuda, else fp32)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="cache storage type")
    p.add_argument("--warmup", type=int, default=3, help="warm-up batches before model-only timing")
    p.add_argument("--min-model-seconds", type=float, default=2.0,
                   help="repeat the model-only pass over N images until at least this long")
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs of the three measurements; best kept")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in this process: the model, in model-only and end-to-end alike "
                        "(default: torch's own; DataLoader workers always use 1)")
    p.add_argument("--tmp", default=None, help="folder for the temporary images and store (default: system temp)")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {device}: no CUDA GPU is visible to torch")
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    precision = a.precision or default_precision(dev.type)
    workers = (os.cpu_count() or 1) if a.workers is None else a.workers
    if a.images < 1 or a.batch_size < 1 or workers < 0 or a.repeat < 1:
        p.error("--images, --batch-size and --repeat must be >= 1, --workers >= 0")

    facts = machine_facts(device)
    print_header("machine", facts)
    print(f"settings: model {a.model}, {a.images} JPEGs at {a.size[0]}x{a.size[1]}, batch {a.batch_size}, "
          f"{workers} workers, precision {precision}, dtype {a.dtype}")

    with tempfile.TemporaryDirectory(prefix="featcache-bench-extract-", dir=a.tmp) as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        manifest_path = make_dataset(folder, a.images, a.size, os.cpu_count() or 1)
        gen_s = time.perf_counter() - t
        jpeg_bytes = sum(f.stat().st_size for f in (folder / "images").iterdir())
        manifest = read_manifest(manifest_path)
        print(f"generated {a.images} JPEGs ({jpeg_bytes / a.images / 1024:.0f} KiB each) in {gen_s:.1f} s")

        t = time.perf_counter()
        backbone = create_backbone(a.model, a.weights, device)
        build_s = time.perf_counter() - t
        params = sum(p.numel() for p in backbone.model.parameters())
        print(f"backbone {a.model}: dim {backbone.dim}, input {backbone.image_size}, {params / 1e6:.1f}M params "
              f"(whole open_clip/timm model), built in {build_s:.1f} s")

        # Interleaved repeats; noise on a shared machine only slows things down, so the fastest run of
        # each stage is the estimate (all runs are kept in the JSON).
        decodes, models, e2es = [], [], []
        for rep in range(a.repeat):
            decode = measure_decode(manifest, backbone, a.batch_size, workers, dev)
            sample = decode.pop("sample")
            if sample is None:
                raise SystemExit("no image decoded; nothing to measure")
            decodes.append(decode)
            models.append(measure_model(backbone, sample, a.images, a.batch_size, dev, precision,
                                        a.warmup, a.min_model_seconds))
            e2es.append(measure_end_to_end(manifest, backbone, folder / f"store-{rep}.zarr", a.batch_size,
                                           workers, device, precision, a.dtype))
            print(f"  run {rep + 1}/{a.repeat}: decode {rate(decodes[-1]['images_per_s'])}, model "
                  f"{rate(models[-1]['images_per_s'])}, end-to-end {rate(e2es[-1]['images_per_s'])} img/s", flush=True)
        decode = max(decodes, key=lambda r: r["images_per_s"])
        model = max(models, key=lambda r: r["images_per_s"])
        e2e = max(e2es, key=lambda r: r["images_per_s"])

    d, m, e = decode["images_per_s"], model["images_per_s"], e2e["images_per_s"]
    serial = 1.0 / (1.0 / d + 1.0 / m)  # decode and model taking turns on the same resources
    res = {
        "command": shlex.join(sys.orig_argv),
        "machine": facts,
        "model": a.model,
        "images": a.images,
        "size": f"{a.size[0]}x{a.size[1]}",
        "jpeg_kib": round(jpeg_bytes / a.images / 1024, 1),
        "batch_size": a.batch_size,
        "workers": workers,
        "precision": precision,
        "dtype": a.dtype,
        "repeat": a.repeat,
        "runs_images_per_s": {
            "decode": [round(r["images_per_s"], 2) for r in decodes],
            "model_only": [round(r["images_per_s"], 2) for r in models],
            "end_to_end": [round(r["images_per_s"], 2) for r in e2es],
        },
        "decode": {k: round(v, 4) if isinstance(v, float) else v for k, v in decode.items()},
        "model_only": {k: round(v, 4) if isinstance(v, float) else v for k, v in model.items()},
        "end_to_end": {k: round(v, 4) if isinstance(v, float) else v for k, v in e2e.items()},
        "e2e_over_model": round(e / m, 4),
        "e2e_over_decode": round(e / d, 4),
        "write_share": round(e2e["write_seconds"] / e2e["seconds"], 4),
        "serial_bound_images_per_s": round(serial, 2),
        "goal_e2e_over_model": GOAL_E2E_OVER_MODEL,
        "goal_met": e / m >= GOAL_E2E_OVER_MODEL,
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    report(res)
    if a.json:
        print(json.dumps(res))
    return res


def rate(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.1f}"


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    d, m, e = res["decode"], res["model_only"], res["end_to_end"]
    t = Table(title=f"extract throughput: {res['model']}, {res['images']} x {res['size']} JPEG, batch "
                    f"{res['batch_size']}, {res['workers']} workers, {res['precision']}, best of {res['repeat']}",
              title_justify="left", header_style="bold")
    for c, j in [("stage", "left"), ("images", "right"), ("seconds", "right"), ("images/s", "right"),
                 ("note", "left")]:
        t.add_column(c, justify=j)
    t.add_row("decode-only", f"{d['images']}", f"{d['seconds']:.2f}", rate(d['images_per_s']),
              "DataLoader(ImageRows, collate_rows) + copy to device")
    t.add_row("model-only", f"{m['images']}", f"{m['seconds']:.2f}", rate(m['images_per_s']),
              f"{m['passes']} pass(es) over N on in-memory batches")
    t.add_row("end-to-end", f"{e['images']}", f"{e['seconds']:.2f}", rate(e['images_per_s']),
              f"run_extract; writer busy {e['write_seconds']:.2f} s, {e['rows_per_chunk']} rows/chunk")
    t.add_row("(serial bound)", "", "", rate(res['serial_bound_images_per_s']),
              "1 / (1/decode + 1/model): no overlap at all")
    r = Table(title="ratios (same run)", title_justify="left", header_style="bold")
    for c, j in [("ratio", "left"), ("value", "right"), ("goal", "left")]:
        r.add_column(c, justify=j)
    on_gpu = res["machine"]["device"].startswith("cuda")
    goal = f">= {res['goal_e2e_over_model']:.2f} (GPU goal): {'met' if res['goal_met'] else 'missed'}"
    goal += "" if on_gpu else " (CPU run: goal not applicable)"
    r.add_row("end-to-end / model-only", f"{res['e2e_over_model']:.3f}", goal)
    r.add_row("end-to-end / decode-only", f"{res['e2e_over_decode']:.3f}", "")
    r.add_row("write share (write_seconds / seconds)", f"{res['write_share']:.3f}", "")
    console = Console(width=140)
    console.print(t)
    console.print(r)
    bottleneck = "decoding" if d["images_per_s"] < m["images_per_s"] else "the model"
    print(f"slower stage alone: {bottleneck} ({rate(min(d['images_per_s'], m['images_per_s']))} img/s); "
          f"load avg at end {res['load_avg_1m_end']}")


if __name__ == "__main__":
    main()

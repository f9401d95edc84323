"""Images/s of a `featcache export` TorchScript module against the eager backbone + head, same batches.

A run is made first (a few synthetic images extracted with --model, a head trained for one epoch), then
exported to .pt. Both sides then take the same raw batches, (B, 3, H, W) float 0..255 at --size:

  eager     the same preprocessing module, uncompiled (Preprocess), then backbone, head, L2 norm
  exported  torch.jit.load of the exported file: preprocessing, traced backbone + head, L2 norm

measured interleaved (eager, exported, eager, ...) --repeat times; medians are reported, and the ratio
exported / eager (goal: >= 0.95). The default model is open_clip ViT-B/32 with random weights: the real
architecture, no download.

    uv run python benchmarks/export.py
    uv run python benchmarks/export.py --model siglip-so400m --weights open_clip_pytorch_model.bin --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import machine_facts, sync  # noqa: E402  (benchmarks/machine.py)
from PIL import Image  # noqa: E402

from featcache.deploy.embedder import Embedder  # noqa: E402
from featcache.deploy.export import export, load_torchscript  # noqa: E402
from featcache.deploy.preprocess import Preprocess, plan  # noqa: E402
from featcache.devices import resolve_device  # noqa: E402
from featcache.extract.backbones import create_backbone  # noqa: E402
from featcache.extract.pipeline import run_extract  # noqa: E402
from featcache.manifest import read_manifest, write_manifest  # noqa: E402
from featcache.train.loop import TrainOptions, load_train_data, train  # noqa: E402


def make_run(folder: Path, model: str, weights: str | None, device: str) -> Path:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    names = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        names.append(f"images/{i}.png")
    m = read_manifest(write_manifest(folder / "m.csv", names, [str(i % 3) for i in range(12)]))
    cache = folder / "c.zarr"
    run_extract(m, create_backbone(model, weights, device), cache, batch_size=4, workers=0, device=device)
    run = folder / "run"
    train(load_train_data(cache, device), TrainOptions(epochs=1, batch_size=4, device=device), run)
    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="open_clip:ViT-B-32", help="registry name, open_clip:ARCH[@TAG] or timm:NAME")
    p.add_argument("--weights", default=None, help="local weights file for --model")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="raw images are SIZE x SIZE (resized inside, as a submission's are)")
    p.add_argument("--batches", type=int, default=4, help="batches per measurement")
    p.add_argument("--repeat", type=int, default=5, help="interleaved measurements of each side; medians reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dev = torch.device(device)
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-export-"))
    t = time.perf_counter()
    run = make_run(tmp, args.model, args.weights, device)
    embedder = Embedder.from_run(run, args.weights, device)
    result = export(run, tmp / "model.pt", weights=args.weights, device=device)
    module = load_torchscript(tmp / "model.pt").to(dev)
    print(f"setup: run and export of {args.model} in {time.perf_counter() - t:.1f} s; self-check cosine {result.check['cosine']}")

    preprocess = Preprocess(plan(embedder.cache_meta["preprocessing"])).to(dev)
    encoder = embedder.encoder()

    def eager(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(encoder(preprocess(x)).float(), dim=1)

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), generator=gen).float().to(dev)
               for _ in range(args.batches)]

    def measure(fn) -> float:
        with torch.inference_mode():
            sync(dev)
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            sync(dev)
        return args.batch_size * args.batches / (time.perf_counter() - t0)

    with torch.inference_mode():  # warm-up, and the two sides agree on these batches
        diff = max(float((eager(b) - module(b)).abs().max()) for b in batches[:1])
    rates: dict[str, list[float]] = {"eager": [], "exported": []}
    for _ in range(args.repeat):
        rates["eager"].append(measure(eager))
        rates["exported"].append(measure(module))
    med = {k: statistics.median(v) for k, v in rates.items()}
    report = {
        "model": args.model, "device": device, "batch_size": args.batch_size, "size": args.size,
        "images_per_s": {k: round(v, 2) for k, v in med.items()},
        "runs": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "ratio": round(med["exported"] / med["eager"], 3),
        "goal": ">= 0.95",
        "max_abs_diff": diff,
        "file_bytes": result.bytes,
        "machine": machine_facts(device),
    }
    print(f"eager backbone + head   {med['eager']:8.2f} img/s  (runs {', '.join(f'{x:.1f}' for x in rates['eager'])})")
    print(f"exported TorchScript    {med['exported']:8.2f} img/s  (runs {', '.join(f'{x:.1f}' for x in rates['exported'])})")
    print(f"exported / eager: {report['ratio']:.3f} (goal >= 0.95: {'met' if report['ratio'] >= 0.95 else 'missed'}); "
          f"max |difference| {diff:.2e}; load avg at end {report['machine']['load_avg_1m']}")
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

"""Augmented views from the cache: what they cost at extraction, and what they do to a trained head.

Two parts, each measured against its baseline in the same run:

  cost   `run_extract` on N synthetic JPEGs without views and with each --augment recipe (V views; flip
         has one), in --repeat interleaved rounds; medians. Reported as extraction time with views /
         without, and the cost of one view in units of a clean extraction: (ratio - 1) / V. Decoding
         happens once per image, so a view costs one preprocessing and one forward pass: close to a whole
         clean extraction where the model dominates (a GPU with SO400M), less where decoding does.
  demo   the demo's digits through the demo's backbone: a head trained on the clean features and one
         trained with --views on each recipe, --seeds each; mMP@5 (mean ± std) on the held-out seen
         digits and on the unseen ones, every head scored as the demo scores it.

    uv run python benchmarks/views.py [--model tiny-vit] [--views 4] [--images 256] [--size 800x600]
                                      [--repeat 3] [--seeds 3] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import make_dataset, parse_size, print_header  # noqa: E402  (benchmarks/extract.py)
from machine import machine_facts  # noqa: E402  (benchmarks/machine.py)

from featcache.extract.augment import AUGMENTS, Augmentation  # noqa: E402
from featcache.extract.backbones import create_backbone  # noqa: E402
from featcache.extract.pipeline import run_extract  # noqa: E402
from featcache.manifest import read_manifest  # noqa: E402


def views_of(augment: str, views: int) -> int:
    return 1 if augment == "flip" else views


def measure_cost(manifest, backbone, folder: Path, views: int, repeat: int, workers: int) -> dict:
    """Median seconds of run_extract per variant, the variants interleaved in every round."""
    variants = ["none", *AUGMENTS]
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(repeat):
        for v in variants:
            aug = None if v == "none" else Augmentation(v, views_of(v, views))
            r = run_extract(manifest, backbone, folder / f"{v}-{rep}.zarr", batch_size=64, workers=workers,
                            augmentation=aug, overwrite=True)
            seconds[v].append(r.seconds)
        print(f"  round {rep + 1}/{repeat}: " + ", ".join(f"{v} {seconds[v][-1]:.2f} s" for v in variants), flush=True)
    base = statistics.median(seconds["none"])
    out = {"none": {"views": 0, "seconds": round(base, 3), "runs": [round(s, 3) for s in seconds["none"]]}}
    for v in AUGMENTS:
        med = statistics.median(seconds[v])
        n = views_of(v, views)
        out[v] = {"views": n, "seconds": round(med, 3), "over_clean": round(med / base, 3),
                  "per_view": round((med / base - 1) / n, 3), "runs": [round(s, 3) for s in seconds[v]]}
    return out


def measure_demo(model: str, folder: Path, views: int, seeds: int, workers: int) -> dict:
    from featcache.demo.data import SEEN, UNSEEN, write_digits
    from featcache.demo.pipeline import DEMO_EPOCHS
    from featcache.evaluate.protocols import EvalSet, run_eval
    from featcache.train.loop import TrainOptions, load_train_data, train

    manifest = read_manifest(write_digits(folder / "digits"))
    backbone = create_backbone(model, None, "cpu")
    result: dict[str, dict] = {}
    for v in ["none", *AUGMENTS]:
        aug = None if v == "none" else Augmentation(v, views_of(v, views))
        cache = folder / f"digits-{v}.zarr"
        run_extract(manifest, backbone, cache, batch_size=128, workers=workers, augmentation=aug)
        data = load_train_data(cache, views=aug is not None)
        sets = {d: EvalSet.load(cache, domains=[d]) for d in (SEEN, UNSEEN)}
        scores: dict[str, list[float]] = {SEEN: [], UNSEEN: []}
        for s in range(seeds):
            run = folder / f"run-{v}-{s}"
            train(data, TrainOptions(epochs=DEMO_EPOCHS, seed=42 + s, views=aug is not None), run)
            for d, es in sets.items():
                scores[d].append(run_eval(run=run, k=5, eval_set=es).result["overall"]["mMP@5"])
        result[v] = {d: {"mean": round(float(np.mean(x)), 4), "std": round(float(np.std(x, ddof=1)) if len(x) > 1 else 0.0, 4),
                         "runs": [round(float(y), 4) for y in x]} for d, x in scores.items()}
        print(f"  {v:9s} seen {result[v][SEEN]['mean']:.4f} ± {result[v][SEEN]['std']:.4f}   "
              f"unseen {result[v][UNSEEN]['mean']:.4f} ± {result[v][UNSEEN]['std']:.4f}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-vit", help="registry name, open_clip:ARCH[@TAG] or timm:NAME")
    p.add_argument("--views", type=int, default=4, help="views per image for openclip, siglip and custom (flip: 1)")
    p.add_argument("--images", type=int, default=256, help="synthetic JPEGs for the cost part")
    p.add_argument("--size", type=parse_size, default=(800, 600), help="their size WxH")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds of the cost part (medians)")
    p.add_argument("--seeds", type=int, default=3, help="heads per recipe in the demo part")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="DataLoader processes")
    p.add_argument("--skip-demo", action="store_true", help="measure the cost part only")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    a = p.parse_args(argv)
    facts = machine_facts("cpu")
    print_header("machine", facts)
    res: dict = {"command": shlex.join(sys.orig_argv), "machine": facts, "model": a.model, "views": a.views,
                 "images": a.images, "size": f"{a.size[0]}x{a.size[1]}", "workers": a.workers}
    with tempfile.TemporaryDirectory(prefix="featcache-bench-views-") as tmp:
        folder = Path(tmp)
        manifest = read_manifest(make_dataset(folder / "jpegs", a.images, a.size, os.cpu_count() or 1))
        backbone = create_backbone(a.model, None, "cpu")
        print(f"cost: {a.images} JPEGs at {a.size[0]}x{a.size[1]}, {a.model}, {a.views} views, {a.workers} workers")
        t = time.perf_counter()
        res["cost"] = measure_cost(manifest, backbone, folder, a.views, a.repeat, a.workers)
        for v in AUGMENTS:
            c = res["cost"][v]
            print(f"  {v:9s} {c['views']} view(s): {c['over_clean']:.3f}x the clean extraction, "
                  f"{c['per_view']:.3f} of a clean extraction per view")
        if not a.skip_demo:
            print(f"demo: digits, {a.model}, heads with and without views, {a.seeds} seeds each (mMP@5)")
            res["demo"] = measure_demo(a.model, folder, a.views, a.seeds, a.workers)
        res["seconds"] = round(time.perf_counter() - t, 1)
    if a.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()

"""The whole pipeline, offline, on scikit-learn's bundled digits: extract, train, evaluate, plot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

DEMO_RUN = Path("runs") / "demo"
DEMO_EPOCHS = 10


def run_demo(model: str = "tiny-vit", weights: Path | None = None, device: str = "cpu",
             say: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run every stage on the digits; ``say`` hears what each stage is doing (rich markup). Returns the
    paths written and the zero-shot and trained scores."""
    from featcache.cache import safe_name
    from featcache.demo.data import DEMO_DIR, write_digits
    from featcache.evaluate.plots import write_plots
    from featcache.evaluate.protocols import EvalSet, run_eval
    from featcache.extract.backbones import create_backbone
    from featcache.extract.pipeline import run_extract
    from featcache.manifest import read_manifest
    from featcache.train.loop import TrainOptions, load_train_data, train

    start = time.perf_counter()
    manifest_path = write_digits(DEMO_DIR)
    manifest = read_manifest(manifest_path)
    say(f"[bold]1/3 extract[/]  {len(manifest):,} scanned digits ({manifest_path}) through backbone {model}")
    if weights is None and model == "tiny-vit":
        say("           [yellow]random weights[/]: the tiny open_clip ViT is seeded, not pretrained (pretrained weights "
            "need a download; try --model siglip-so400m --weights FILE)")
    backbone = create_backbone(model, weights, device)
    cache = Path("cache") / "demo" / f"{safe_name(model)}.zarr"
    extracted = run_extract(manifest, backbone, cache, batch_size=128, workers=1, device=device,
                            precision="bf16" if device.startswith("cuda") else "fp32")
    say(f"           {cache}: {extracted.rows:,} rows x {backbone.dim} dims"
        + (" (already there)" if extracted.skipped else f" in {extracted.seconds:.1f} s"))

    data = load_train_data(cache, device)
    say(f"[bold]2/3 train[/]    subcenter-arcface head on digits 0-5 ({len(data.labels):,} rows), {DEMO_EPOCHS} epochs")
    options = TrainOptions(epochs=DEMO_EPOCHS, device=device)
    trained = train(data, options, DEMO_RUN, overwrite=True)
    say(f"           {DEMO_RUN}: final loss {trained.metrics[-1]['loss']:.3f} in {trained.seconds:.1f} s")

    say("[bold]3/3 eval[/]     digits 6-9 (classes the head never saw): queries against the index")
    es = EvalSet.load(cache)
    zero = run_eval(zero_shot="pooled", k=5, eval_set=es)
    ev = run_eval(run=DEMO_RUN, k=5, show=8, eval_set=es)
    plots = write_plots(ev, {"zero-shot": zero.result, "trained head": ev.result}, DEMO_RUN / "plots")
    return {
        "cache": str(cache),
        "run": str(DEMO_RUN),
        "plots": [str(p) for p in plots],
        "zero_shot": zero.result["overall"],
        "trained_head": ev.result["overall"],
        "seconds": round(time.perf_counter() - start, 1),
    }

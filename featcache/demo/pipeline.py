"""The whole pipeline, offline, on scikit-learn's bundled digits: extract, train, evaluate, then the
trained model out of featcache: export, index, and search through the exported file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

DEMO_RUN = Path("runs") / "demo"
DEMO_EPOCHS = 10
SEARCH_DIGITS = (1, 4, 7, 9)  # a query image of each, two seen in training and two not
SEARCH_K = 5


def run_demo(model: str = "tiny-vit", weights: Path | None = None, device: str = "cpu",
             say: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run every stage on the digits; ``say`` hears what each stage is doing (rich markup). Returns the
    paths written and the zero-shot and trained scores, overall and for seen and unseen digits."""
    from featcache.cache import FeatureCache, safe_name
    from featcache.demo.data import DEMO_DIR, SEEN, UNSEEN, write_digits
    from featcache.deploy.export import export
    from featcache.deploy.index import Index, build_index, search_images
    from featcache.devices import default_precision
    from featcache.evaluate.plots import search_grid, write_plots
    from featcache.evaluate.protocols import EvalSet, merge_scores, run_eval
    from featcache.extract.backbones import create_backbone
    from featcache.extract.pipeline import run_extract
    from featcache.manifest import read_manifest, resolve
    from featcache.train.loop import TrainOptions, load_train_data, train
    from featcache.train.runs import Run

    start = time.perf_counter()
    manifest_path = write_digits(DEMO_DIR)
    manifest = read_manifest(manifest_path)
    say(f"[bold]1/5 extract[/]  {len(manifest):,} scanned digits ({manifest_path}) through backbone {model}")
    if weights is None and model == "tiny-vit":
        say("           [yellow]random weights[/]: the tiny open_clip ViT is seeded, not pretrained (pretrained weights "
            "need a download; try --model siglip-so400m --weights FILE)")
    backbone = create_backbone(model, weights, device)
    cache = Path("cache") / "demo" / f"{safe_name(model)}.zarr"
    extracted = run_extract(manifest, backbone, cache, batch_size=128, workers=1, device=device,
                            precision=default_precision(device))
    say(f"           {cache}: {extracted.rows:,} rows x {backbone.dim} dims"
        + (" (already there)" if extracted.skipped else f" in {extracted.seconds:.1f} s"))

    data = load_train_data(cache, device)
    say(f"[bold]2/5 train[/]    subcenter-arcface head on digits 0-5 ({len(data.labels):,} rows; every fourth image "
        f"held out), {DEMO_EPOCHS} epochs")
    trained = train(data, TrainOptions(epochs=DEMO_EPOCHS, device=device), DEMO_RUN, overwrite=True)
    say(f"           {DEMO_RUN}: final loss {trained.metrics[-1]['loss']:.3f} in {trained.seconds:.1f} s")

    say("[bold]3/5 eval[/]     held-out images of digits 0-5 (seen in training) and digits 6-9 (never seen), "
        "each group its own queries and index")
    zero_parts, trained_parts = {}, {}
    for domain in (SEEN, UNSEEN):
        es = EvalSet.load(cache, domains=[domain])
        zero_parts[domain] = run_eval(zero_shot="pooled", k=5, eval_set=es).result
        shown = run_eval(run=DEMO_RUN, k=5, show=8, eval_set=es)
        trained_parts[domain] = shown.result
    zero = merge_scores(list(zero_parts.values()), "guiec", 5)
    trained_result = {**merge_scores(list(trained_parts.values()), "guiec", 5), "embeddings": f"run {DEMO_RUN}",
                      "cache": str(cache.resolve())}
    # what `featcache runs` shows for the demo's run: both groups, every domain of the cache, at k = 5
    Run.load(DEMO_RUN).record_eval({"cache": str(cache.resolve()), "protocol": "guiec", "k": 5, "domains": None,
                                    "label_sep": None, "groups": "each domain its own queries and index"}, trained_result)
    plots = write_plots(shown, {"zero-shot": zero, "trained head": trained_result}, DEMO_RUN / "plots", overwrite=True)
    scores = {d: {"zero_shot": zero_parts[d]["overall"], "trained_head": trained_parts[d]["overall"]} for d in (SEEN, UNSEEN)}

    model_file = DEMO_RUN / "model.pt"
    exported = export(DEMO_RUN, model_file, weights=weights, device=device, overwrite=True)
    say(f"[bold]4/5 export[/]   {model_file}: TorchScript, raw images in, {exported.dim}-d embeddings out "
        f"({exported.bytes / 2**20:.1f} MB; cosine {exported.check['cosine']:.6f} to the pipeline on a probe image)")

    index_dir = DEMO_RUN / "index"
    index_meta = build_index(cache, index_dir, run=DEMO_RUN, overwrite=True)
    c = FeatureCache.open(cache)
    labels, splits, paths = c.classes()[c.labels()], c.strings("splits"), c.strings("paths")
    queries = [str(resolve(manifest.root, paths[next(i for i in range(c.rows) if labels[i] == str(d) and splits[i] == "query")]))
               for d in SEARCH_DIGITS]
    found, _ = search_images(Index.open(index_dir), queries, k=SEARCH_K, model=model_file)
    plots.append(search_grid(found, DEMO_RUN / "plots" / "search.png", overwrite=True))
    say(f"[bold]5/5 search[/]   {index_dir}: {index_meta['rows']:,} digits; {len(queries)} query images embedded by "
        f"{model_file}, top {SEARCH_K} each")
    return {
        "cache": str(cache),
        "run": str(DEMO_RUN),
        "model": str(model_file),
        "index": str(index_dir),
        "queries": queries,
        "plots": [str(p) for p in plots],
        "scores": scores,
        "zero_shot": zero["overall"],
        "trained_head": trained_result["overall"],
        "search": found,
        "seconds": round(time.perf_counter() - start, 1),
    }

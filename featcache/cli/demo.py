"""``featcache demo``: the whole pipeline, offline, on scikit-learn's bundled digits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from featcache.cli.console import err, flag, friendly_errors, out, print_json, table

app = typer.Typer()


@app.command()
@friendly_errors
def demo(
    model: str = typer.Option("tiny-vit", "--model", "-m", help="Backbone (any `featcache models` name)."),
    weights: Optional[Path] = typer.Option(None, help="Local checkpoint for --model (e.g. SigLIP's, to see real numbers)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda. \\[default: cuda when available]"),
    json_out: bool = flag("--json", help="Print the results as JSON."),
) -> None:
    """Run the whole pipeline offline on scikit-learn's bundled handwritten digits.

    Digits 0-5 train the head; digits 6-9, never seen in training, are split into query and index.
    Writes images and manifest under manifests/demo/, the cache under cache/demo/, the run and plots
    under runs/demo/, and prints zero-shot and trained scores side by side.
    """
    from featcache.demo.pipeline import run_demo
    from featcache.devices import resolve_device

    summary = run_demo(model, weights, resolve_device(device), say=(lambda message: None) if json_out else err.print)
    if json_out:
        print_json(summary)
        return
    from featcache.demo.data import SEEN, UNSEEN

    scores = summary["scores"]
    columns = [(d, side) for d in (SEEN, UNSEEN) for side in ("zero_shot", "trained_head")]
    rows = [[m, *[scores[d][side][m] for d, side in columns]] for m in ("mMP@5", "mAP@5", "R@1", "queries")]
    out.print(table("Retrieval on held-out digits: seen in training (0-5) and never seen (6-9)",
                    ["", *[f"{d}: {'zero-shot' if side == 'zero_shot' else 'trained'}" for d, side in columns]], rows))
    seen, unseen = scores[SEEN], scores[UNSEEN]
    if seen["trained_head"]["mMP@5"] > seen["zero_shot"]["mMP@5"]:
        err.print("On held-out images of the digits it was trained on, the head beats the zero-shot baseline: training works.")
    else:
        err.print("[yellow]The trained head does not beat the zero-shot baseline on the digits it was trained on.[/]")
    if unseen["trained_head"]["mMP@5"] < unseen["zero_shot"]["mMP@5"] and weights is None:
        err.print("On digits 6-9, never seen in training, transfer needs what this demo lacks: a pretrained backbone "
                  "and many classes (M4D-35k: 34.8k). With random weights the zero-shot baseline stays ahead.")
    plots, cache, run = summary["plots"], summary["cache"], summary["run"]
    err.print(f"plots: {', '.join(plots)}  ({summary['seconds']:.0f} s in all)", markup=False)
    fc = "uv run featcache" if os.environ.get("UV_RUN_RECURSION_DEPTH") else "featcache"  # as the user ran us
    err.print("next:\n"
              f"  {fc} info {cache}\n"
              f"  {fc} sweep --cache {cache} --loss arcface --loss cosface --loss subcenter-arcface --seeds 3\n"
              f"  {fc} eval --cache {cache} --run {run} --plot {run}/plots --overwrite\n"
              f"  {fc} export --run {run} --out {run}/submission.zip\n"
              f"  {fc} search --index {summary['index']} --model {summary['model']} {summary['queries'][2]}\n"
              f"  {fc} serve --index {summary['index']}\n"
              f"  {fc} runs")

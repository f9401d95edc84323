"""``featcache train-head``, ``losses`` and ``sweep``: stage two on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from featcache.cli.console import (
    UserError, allow_break_lock, break_lock_flag, err, flag, friendly_errors, out, place, print_json, progress_bar,
    progress_updates, table,
)
from featcache.train.options import TrainOptions

app = typer.Typer()
DEFAULTS = TrainOptions()  # the options' defaults, as the library states them


def parse_loss_opts(items: list[str]) -> dict[str, float]:
    opts: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--loss-opt {item!r}: expected NAME=VALUE, e.g. --loss-opt momentum=0.05")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"--loss-opt {item!r}: {value!r} is not a number") from None
        key = name.strip().replace("-", "_")
        opts[key] = int(number) if number.is_integer() and key == "sub_centers" else number
    return opts


def default_run_dir(cache, loss: str) -> Path:
    import datetime as dt

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cache.parent.name}-{cache.stem}-{loss}-{stamp}"


@app.command("train-head", epilog="Example: featcache train-head --cache cache/m4d-35k/siglip-so400m.zarr --loss arcface --margin 0.3")
@friendly_errors
def train_head(
    cache: str = typer.Option(..., "--cache", "-c", help="Feature cache to train from (rows with split == train): a folder or a URL."),
    loss: str = typer.Option(DEFAULTS.loss, "--loss", "-l", help="Loss name; `featcache losses` lists them."),
    sub_centers: Optional[int] = typer.Option(None, help="Sub-centers per class (k) for subcenter-arcface. \\[default: 3]"),
    margin: Optional[float] = typer.Option(None, help="Margin; radians for angular losses. \\[default: the loss's]"),
    scale: Optional[float] = typer.Option(None, help="Logit scale s. \\[default: the loss's]"),
    loss_opt: list[str] = typer.Option([], "--loss-opt", help="Any other loss option, NAME=VALUE (repeatable)."),
    embed_dim: int = typer.Option(DEFAULTS.embed_dim, help="Output embedding size (64 in the challenge)."),
    dropout: float = typer.Option(DEFAULTS.dropout, help="Dropout before the projection."),
    epochs: int = typer.Option(DEFAULTS.epochs, help="Passes over the training rows."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, help="Rows per step."),
    lr: float = typer.Option(DEFAULTS.lr, help="Peak learning rate (Adam)."),
    weight_decay: float = typer.Option(DEFAULTS.weight_decay, help="Adam's (coupled L2) weight decay."),
    warmup_epochs: float = typer.Option(DEFAULTS.warmup_epochs, help="Linear warm-up length, in epochs; cosine decay after it."),
    min_lr: float = typer.Option(DEFAULTS.min_lr, help="Learning rate at the end of the cosine."),
    optimizer: str = typer.Option(DEFAULTS.optimizer, help="adam (coupled weight decay, the paper's), adamw (decoupled) or sgd."),
    momentum: float = typer.Option(DEFAULTS.momentum, help="SGD's momentum."),
    warmup: str = typer.Option(DEFAULTS.warmup, help="Warm-up shape: linear, or exponential (from lr / 100)."),
    seed: int = typer.Option(DEFAULTS.seed, help="Seed for initialisation, order, dropout and class sampling."),
    sample_classes: float = typer.Option(DEFAULTS.sample_classes, help="Partial FC: fraction of the other classes used per step (1 = all)."),
    views: bool = flag("--views", help="Each epoch, train every row on one of its clean and augmented views, drawn at random (needs a cache extracted with --views)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda. \\[default: cuda when available]"),
    precision: Optional[str] = typer.Option(None, help="Class-logit matmul precision, fp32 or bf16. \\[default: bf16 on GPU, fp32 on CPU]"),
    out_path: Optional[str] = typer.Option(None, "--out", help="Run directory: a folder, or an s3:// or gs:// URL. \\[default: runs/<cache>-<loss>-<time>]"),
    resume: bool = flag(help="Continue an interrupted run in --out from its last finished epoch."),
    overwrite: bool = flag(help="Replace an existing run directory."),
    break_lock: bool = break_lock_flag(),
    quiet: bool = flag("--quiet", "-q", help="No progress bar."),
    json_out: bool = flag("--json", help="Print the result as JSON."),
) -> None:
    """Train a projection head and margin loss from cached features; defaults are the paper's recipe.

    The run directory gets config.json, metrics.jsonl (one line per epoch) and head.safetensors.
    Ctrl-C keeps the last finished epoch's head (config.json says complete: false); --resume continues.
    Load a run in Python with featcache.Run.load(DIR).embed(features).
    """
    from featcache.devices import default_precision, resolve_device
    from featcache.train.loop import check_options, load_train_data, train

    dev = resolve_device(device)
    given = {"sub_centers": sub_centers, "margin": margin, "scale": scale}
    opts = {**parse_loss_opts(loss_opt), **{k: v for k, v in given.items() if v is not None}}
    options = TrainOptions(loss=loss, loss_opts=opts, embed_dim=embed_dim,
                           dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                           warmup_epochs=warmup_epochs, min_lr=min_lr, seed=seed, device=dev,
                           optimizer=optimizer, momentum=momentum, warmup=warmup,
                           precision=precision or default_precision(dev), sample_classes=sample_classes, views=views)
    allow_break_lock(break_lock)
    cache = place(cache)
    data = load_train_data(cache, dev, views=views)
    check_options(options, data)
    target = place(out_path) or default_run_dir(cache, loss)
    total = epochs * -(-len(data.labels) // batch_size)
    with progress_updates(f"train {loss}", unit="step", disable=quiet or json_out) as update:
        def on_step(info) -> None:
            done = info.epoch * info.steps_per_epoch + info.step + 1
            last = info.step + 1 == info.steps_per_epoch
            update(done, total, f"epoch {info.epoch + 1}/{epochs} loss {float(info.loss):.3f}"
                   if info.step % 50 == 0 or last else None)

        result = train(data, options, target, resume=resume, overwrite=overwrite, on_step=on_step)
    report = {"run": str(target), "complete": result.complete, "epochs": result.metrics, "train_seconds": round(result.seconds, 3),
              "train_rows": len(data.labels), "classes": data.num_classes}
    if json_out:
        print_json(report)
    else:
        out.print(table(f"featcache train-head: {loss} on {len(data.labels):,} rows, {data.num_classes:,} classes",
                        ["epoch", "loss", "train acc", "lr", "seconds"],
                        [[m["epoch"], m["loss"], m["train_acc"], m["lr"], m["seconds"]] for m in result.metrics]))
        err.print(f"run: {target}\nnext: featcache eval --cache {cache} --run {target}", markup=False)
    if not result.complete:
        done = len(result.metrics)
        if done:
            err.print(f"[yellow]interrupted[/] after epoch {done}: its head is in {escape(str(target))} (config.json complete: false); "
                      f"continue with the same command and --resume --out {escape(str(target))}")
        else:
            err.print(f"[yellow]interrupted[/] before the first epoch finished; run the same command with "
                      f"--resume --out {escape(str(target))} to start it again")
        raise typer.Exit(130)


@app.command()
@friendly_errors
def losses(json_out: bool = flag("--json", help="Print JSON instead of a table.")) -> None:
    """List the losses with their options and defaults (margins of angular losses are in radians)."""
    from featcache.train.losses import LOSSES

    rows = [{"name": s.name, "options": {k: v for k, v in s.defaults.items()}, "summary": s.summary} for s in LOSSES.values()]
    if json_out:
        print_json(rows)
        return
    out.print(table("Losses (featcache train-head --loss NAME)", ["name", "options (defaults)", "what"],
                    [[r["name"], ", ".join(f"{k}={'from training counts' if v is None else v}" for k, v in r["options"].items()
                                            if k not in ("sample_fraction", "precision")), r["summary"]] for r in rows],
                    justify_numbers=False))
    out.print("Every loss also takes sample_fraction (--sample-classes) and precision (--precision). "
              "Set others with --loss-opt NAME=VALUE.")


@app.command(epilog="Example: featcache sweep -c cache/demo/tiny-vit.zarr --loss arcface --loss cosface --margin 0.2 --margin 0.4 --seeds 3")
@friendly_errors
def sweep(
    cache: list[str] = typer.Option(..., "--cache", "-c", help="Feature cache to train from; repeat it to compare backbones (a backbone column, and each cache's zero-shot rows)."),
    loss: list[str] = typer.Option([DEFAULTS.loss], "--loss", "-l", help="Losses to compare (repeatable)."),
    margin: list[float] = typer.Option([], help="Margins to try (repeatable; radians for angular losses)."),
    scale: list[float] = typer.Option([], help="Scales to try (repeatable)."),
    sub_centers: list[int] = typer.Option([], help="Sub-center counts to try (repeatable)."),
    embed_dim: list[int] = typer.Option([DEFAULTS.embed_dim], help="Embedding sizes to try (repeatable)."),
    dropout: list[float] = typer.Option([DEFAULTS.dropout], help="Dropouts to try (repeatable)."),
    lr: list[float] = typer.Option([DEFAULTS.lr], help="Learning rates to try (repeatable)."),
    epochs: list[int] = typer.Option([DEFAULTS.epochs], help="Epoch counts to try (repeatable)."),
    batch_size: list[int] = typer.Option([DEFAULTS.batch_size], help="Batch sizes to try (repeatable)."),
    weight_decay: float = typer.Option(DEFAULTS.weight_decay, help="Adam's weight decay."),
    warmup_epochs: float = typer.Option(DEFAULTS.warmup_epochs, help="Warm-up epochs."),
    min_lr: float = typer.Option(DEFAULTS.min_lr, help="Final learning rate."),
    optimizer: str = typer.Option(DEFAULTS.optimizer, help="adam (the paper's), adamw or sgd."),
    momentum: float = typer.Option(DEFAULTS.momentum, help="SGD's momentum."),
    warmup: str = typer.Option(DEFAULTS.warmup, help="Warm-up shape: linear or exponential."),
    sample_classes: float = typer.Option(DEFAULTS.sample_classes, help="Partial FC fraction."),
    views: bool = flag("--views", help="Train on the caches' augmented views too (see train-head --views)."),
    seeds: int = typer.Option(1, help="Seeds per combination (42, 43, ...): scores are mean ± std over them."),
    eval_cache: Optional[str] = typer.Option(None, help="Cache with query/index rows to score each head on. \\[default: --cache, when it has them]"),
    label_sep: Optional[str] = typer.Option(None, help="Declare multi-label queries when scoring, as `featcache eval --label-sep` does."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda. \\[default: cuda when available]"),
    precision: Optional[str] = typer.Option(None, help="fp32 or bf16. \\[default: bf16 on GPU, fp32 on CPU]"),
    out_path: Optional[str] = typer.Option(None, "--out", help="Sweep directory (a folder or a URL). \\[default: runs/sweep-<time>]"),
    quiet: bool = flag("--quiet", "-q", help="No progress bar."),
    json_out: bool = flag("--json", help="Print the results as JSON."),
) -> None:
    """Train every combination of the repeated options (× seeds) from one load of the features.

    Prints final loss and, when a query/index split is available, mMP@5 as mean ± std over seeds;
    writes sweep.json and sweep.md (and one run directory per head) into the sweep directory.
    """
    from featcache.devices import default_precision, resolve_device
    from featcache.evaluate.protocols import sweep_scorer
    from featcache.train.sweep import check_sweep_out, grid, run_sweep, same_images

    dev = resolve_device(device)
    combos = grid(loss, {"margin": margin, "scale": scale, "sub_centers": sub_centers},
                  {"embed_dim": embed_dim, "dropout": dropout, "lr": lr, "epochs": epochs, "batch_size": batch_size},
                  {"weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "min_lr": min_lr,
                   "optimizer": optimizer, "momentum": momentum, "warmup": warmup,
                   "sample_classes": sample_classes, "views": views, "device": dev, "precision": precision or default_precision(dev)})
    import datetime as dt

    cache, eval_cache = [place(c) for c in cache], place(eval_cache)
    target = place(out_path) or Path("runs") / f"sweep-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if eval_cache is not None and len(cache) > 1:
        raise UserError("--eval-cache goes with one --cache (each backbone is scored on its own cache's query/index rows)")
    same_images(cache)  # refused before the progress bar is drawn
    check_sweep_out(target)
    bar = progress_bar("run", disable=quiet or json_out)
    with bar:
        task = bar.add_task("sweep", total=len(combos) * seeds * len(cache))
        try:
            summary = run_sweep(cache, combos, seeds, target, [sweep_scorer(c, eval_cache, label_sep) for c in cache],
                                on_run=lambda name: bar.update(task, advance=1, description=name))
        except KeyboardInterrupt:
            err.print(f"[yellow]interrupted[/]: the finished combinations are in {escape(str(target / 'sweep.json'))}")
            raise typer.Exit(130) from None
    chart = None
    if summary["metric"]:
        from featcache.evaluate.plots import sweep_chart

        chart = sweep_chart(summary, target / "sweep.png")
    if json_out:
        print_json(summary)
        return
    out.print(summary_table(summary))
    err.print(f"wrote {target / 'sweep.json'}, {target / 'sweep.md'}" + (f" and {chart}" if chart else ""), markup=False)


def summary_table(summary: dict):
    metric = summary.get("metric")
    cols = ["backbone", "loss", "options", "final loss", "train acc", *([metric] if metric else []), "seconds"]
    rows = []
    for r in summary["results"]:
        rows.append([r.get("backbone", "-"), r["loss"], r["label"], r["final_loss"], r["train_acc"],
                     *([r.get(metric, "-")] if metric else []), r["seconds"]])
    return table(f"featcache sweep ({summary['seeds']} seed{'s' if summary['seeds'] > 1 else ''} each)", cols, rows, justify_numbers=False)

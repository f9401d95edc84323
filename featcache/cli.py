"""The ``featcache`` command line: one command per stage, each a thin layer over the library."""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from featcache import __version__
from featcache.console import UserError, err, friendly_errors, human_bytes, out, print_json, progress_bar, table
from featcache.manifest_cli import manifest_app

app = typer.Typer(
    name="featcache",
    help=(
        "Cache frozen-backbone image embeddings once, then train and evaluate retrieval heads from the "
        "cache in seconds.\n\n"
        "Stages: [bold]extract[/] (images -> Zarr feature cache), [bold]train-head[/] (cache -> projection "
        "head), [bold]eval[/] (retrieval scores). Start with [bold]featcache demo[/]."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.add_typer(manifest_app, name="manifest")

DEFAULT_CACHE_ROOT = Path("cache")


class DType(str, Enum):
    float16 = "float16"
    float32 = "float32"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: expected cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: expected cpu, cuda or cuda:N")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible to torch on this machine; use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(d.index or 0)  # pinned-memory threads and new tensors follow the current device
    return device


def default_cache_path(manifest: Path, model: str) -> Path:
    from featcache.cache import safe_name

    return DEFAULT_CACHE_ROOT / manifest.stem / f"{safe_name(model)}.zarr"


@app.command()
@friendly_errors
def models(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the backbone registry: short name, source, output dim, image size, vision parameters.

    Any other open_clip or timm model works too, as [bold]open_clip:ARCH\\[@TAG][/] or [bold]timm:NAME[/].
    """
    from featcache.models import describe_registry

    rows = describe_registry()
    if json_out:
        print_json(rows)
        return
    out.print(table("Backbones (featcache extract --model NAME)", ["name", "source", "dim", "image size", "params (M)", "what"],
                    [[r["name"], r["source"], r["dim"], r["image_size"], r["params_m"], r["summary"]] for r in rows]))
    out.print("Also: open_clip:ARCH\\[@TAG] (see open_clip.list_models()) and timm:NAME. "
              "Give --weights FILE to use a local checkpoint instead of a download.")


@app.command(epilog="Example: featcache extract --model siglip-so400m --manifest manifests/m4d-35k.csv --root /data")
@friendly_errors
def extract(
    model: str = typer.Option(..., "--model", "-m", help="Backbone: a name from `featcache models`, open_clip:ARCH\\[@TAG] or timm:NAME."),
    manifest: Path = typer.Option(..., "--manifest", help="CSV with columns path,label[,domain,split,x1,y1,x2,y2]."),
    root: Optional[Path] = typer.Option(None, help="Folder the manifest's relative paths start from. \\[default: the manifest's folder]"),
    weights: Optional[Path] = typer.Option(None, help="Local checkpoint file to load instead of downloading the pretrained weights."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Cache to write. \\[default: cache/<manifest stem>/<model>.zarr]"),
    dtype: DType = typer.Option(DType.float16, help="Storage type of the features."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, min=0, help="DataLoader processes that decode images. \\[default: all cores on GPU, half on CPU]"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda[:N]. \\[default: cuda when available]"),
    precision: Optional[Precision] = typer.Option(None, help="Autocast precision of the model. \\[default: bf16 on GPU, fp32 on CPU]"),
    chunk_rows: Optional[int] = typer.Option(None, min=1, help="Rows per Zarr chunk, the unit of resume. \\[default: about 4 MB per chunk]"),
    overwrite: bool = typer.Option(False, help="Replace an existing cache at --out, even a different one."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run a frozen backbone once over a manifest's images and store the embeddings in a Zarr cache.

    Interrupted runs (Ctrl-C, a kill, a crash) continue where they stopped: run the same command again.
    Images that are missing or cannot be decoded do not stop the run; they become failure rows
    (see [bold]featcache info[/]). Under [bold]torchrun --nproc-per-node N -m featcache extract ...[/]
    every rank writes its own chunks of the same store.
    """
    from featcache.extract import Dist, Progress, run_extract
    from featcache.manifest import read_manifest
    from featcache.models import create_backbone

    dist = Dist.from_env()
    dev = resolve_device(device)
    if dist.world > 1 and dev.startswith("cuda"):
        import torch

        dev = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(dev)
    prec = (precision.value if precision else ("bf16" if dev.startswith("cuda") else "fp32"))
    if workers is None:
        cores = os.cpu_count() or 1
        workers = min(cores, 16) if dev.startswith("cuda") else max(1, cores // 2)
    m = read_manifest(manifest, root)
    target = out_path or default_cache_path(manifest, model)
    dist.init(dev)
    show = dist.coordinator and not quiet and not json_out
    try:
        backbone = create_backbone(model, weights, dev)
        bar = progress_bar("img", field="failed", disable=not show)
        with bar:
            task = bar.add_task(f"extract {model}", total=None, failed=0)

            def update(p: Progress) -> None:
                bar.update(task, total=p.total, completed=p.done, failed=p.failed)

            try:
                result = run_extract(m, backbone, target, dtype=dtype.value, batch_size=batch_size, workers=workers,
                                     device=dev, precision=prec, chunk_rows=chunk_rows, overwrite=overwrite,
                                     progress=Progress(update=update), dist=dist)
            except KeyboardInterrupt:
                _report_interrupted(target)
                raise typer.Exit(130) from None
    finally:
        dist.close()
    if not dist.coordinator:
        return
    from featcache.cache import FeatureCache

    summary = FeatureCache.open(target).summary()
    report = {
        "cache": str(target),
        "skipped": result.skipped,
        "rows": summary["rows"],
        "valid": summary["valid"],
        "failed": summary["failed"],
        "failure_reasons": summary["failure_reasons"],
        "rows_this_run": result.rows_this_run,
        "seconds": round(result.seconds, 3),
        "images_per_second": round(result.rows_this_run / result.seconds, 1) if result.seconds and result.rows_this_run else None,
        "write_seconds": round(result.write_seconds, 3),
        "dim": summary["dim"],
        "dtype": summary["dtype"],
        "key": summary["key"],
        "bytes_on_disk": summary["bytes_on_disk"],
    }
    if json_out:
        print_json(report)
        return
    if result.skipped:
        err.print(f"{target} is already complete for this manifest and model: nothing to do.")
    rows = [
        ["cache", str(target)],
        ["rows", report["rows"]],
        ["valid", report["valid"]],
        ["failed", report["failed"]],
        *[[f"  {reason}", count] for reason, count in report["failure_reasons"].items()],
        ["extracted this run", report["rows_this_run"]],
        ["seconds", report["seconds"]],
        ["images/s", report["images_per_second"]],
        ["features", f"{report['rows']:,} x {report['dim']} {report['dtype']}"],
        ["size on disk", human_bytes(report["bytes_on_disk"])],
    ]
    out.print(table("featcache extract", ["", "value"], rows))
    if report["failed"]:
        err.print(f"{report['failed']} images failed; `featcache info {target}` lists them.")


def _report_interrupted(target: Path) -> None:
    try:
        from featcache.cache import FeatureCache

        done = FeatureCache.open(target).chunk_done()
        err.print(f"[yellow]interrupted:[/] {int(done.sum())} of {done.size} chunks are done in {target}; "
                  "run the same command again to continue.")
    except Exception:
        err.print("[yellow]interrupted[/] before the cache was created.")


@app.command()
@friendly_errors
def info(
    cache: Path = typer.Argument(..., help="A cache written by `featcache extract` or `featcache import`."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show a cache's provenance, rows per split and domain, failures, and size on disk."""
    from featcache.cache import FeatureCache

    s = FeatureCache.open(cache).summary()
    if json_out:
        print_json(s)
        return
    b = s["backbone"]
    status = "complete" if s["complete"] else f"INCOMPLETE ({s['chunks_done']} of {s['chunks']} chunks done)"
    out.print(table(f"{cache}", ["", "value"], [
        ["status", status],
        ["key", s["key"]],
        ["backbone", f"{b['name']} ({b['library']}:{b['arch']}{'@' + b['pretrained'] if b.get('pretrained') and b['library'] == 'open_clip' else ''})"],
        ["weights", b["weights"]],
        ["preprocessing", ", ".join(f"{k}={v}" for k, v in s["preprocessing"].items() if k != "library")],
        ["precision", s["precision"]],
        ["features", f"{s['rows']:,} x {s['dim']} {s['dtype']}"],
        ["classes", s["classes"]],
        ["valid / failed", f"{s['valid']:,} / {s['failed']:,}"],
        ["manifest", s["manifest"]],
        ["created", s["created"]],
        ["featcache", s["featcache_version"]],
        ["size on disk", human_bytes(s["bytes_on_disk"])],
    ]))
    for what in ("splits", "domains"):
        out.print(table(None, [what[:-1], "rows", "valid"], [[k, v["rows"], v["valid"]] for k, v in s[what].items()]))
    if s["failed"]:
        out.print(table(f"failures ({s['failed']})", ["row", "path", "reason"],
                        [[f["row"], f["path"], f["reason"]] for f in s["failed_rows"]], justify_numbers=False))
        if s["failed"] > len(s["failed_rows"]):
            out.print(f"... and {s['failed'] - len(s['failed_rows'])} more (--json lists the first 20 too; "
                      "read the `failures` array for all).")


@app.command("import")
@friendly_errors
def import_(
    features: Path = typer.Option(..., "--features", help="A .npy array (rows, dim): row i belongs to manifest row i."),
    manifest: Path = typer.Option(..., "--manifest", help="The manifest the rows come from."),
    out_path: Path = typer.Option(..., "--out", help="Cache to write."),
    dtype: DType = typer.Option(DType.float16, help="Storage type of the features."),
    chunk_rows: Optional[int] = typer.Option(None, min=1, help="Rows per Zarr chunk. \\[default: about 4 MB per chunk]"),
    overwrite: bool = typer.Option(False, help="Replace an existing cache at --out."),
    json_out: bool = typer.Option(False, "--json", help="Print the cache's attributes as JSON."),
) -> None:
    """Build a cache from embeddings computed elsewhere, so the rest of featcache can use them.

    Example: featcache import --features feats.npy --manifest train.csv --out cache/train/mine.zarr
    """
    import numpy as np

    from featcache.cache import import_features
    from featcache.manifest import read_manifest
    from featcache.models import file_sha256

    if not features.is_file():
        raise UserError(f"--features {features}: file not found")
    try:
        arr = np.load(features, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise UserError(f"--features {features}: not a .npy array ({e})") from None
    meta = import_features(arr, read_manifest(manifest), out_path, source=str(features), source_sha256=file_sha256(features),
                           dtype=dtype.value, chunk_rows=chunk_rows, overwrite=overwrite)
    if json_out:
        print_json(meta)
    else:
        out.print(f"wrote {out_path}: {meta['rows']:,} x {meta['dim']} {meta['dtype']} (key {meta['key']})")


# ---------------------------------------------------------------------------------------------
# Stage two: train-head, sweep, losses


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


def default_run_dir(cache: Path, loss: str) -> Path:
    import datetime as dt

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cache.parent.name}-{cache.stem}-{loss}-{stamp}"


def train_precision(precision: Optional[str], device: str) -> str:
    if precision is None:
        return "bf16" if device.startswith("cuda") else "fp32"
    if precision not in ("fp32", "bf16"):
        raise UserError(f"--precision {precision}: expected fp32 or bf16")
    return precision


@app.command("train-head", epilog="Example: featcache train-head --cache cache/m4d-35k/siglip-so400m.zarr --loss arcface --margin 0.3")
@friendly_errors
def train_head(
    cache: Path = typer.Option(..., "--cache", "-c", help="Feature cache to train from (rows with split == train)."),
    loss: str = typer.Option("subcenter-arcface", "--loss", "-l", help="Loss name; `featcache losses` lists them."),
    sub_centers: Optional[int] = typer.Option(None, help="Sub-centers per class (k) for subcenter-arcface. \\[default: 3]"),
    margin: Optional[float] = typer.Option(None, help="Margin; radians for angular losses. \\[default: the loss's]"),
    scale: Optional[float] = typer.Option(None, help="Logit scale s. \\[default: the loss's]"),
    loss_opt: list[str] = typer.Option([], "--loss-opt", help="Any other loss option, NAME=VALUE (repeatable)."),
    embed_dim: int = typer.Option(64, help="Output embedding size (64 in the challenge)."),
    dropout: float = typer.Option(0.2, help="Dropout before the projection."),
    epochs: int = typer.Option(10, help="Passes over the training rows."),
    batch_size: int = typer.Option(128, help="Rows per step."),
    lr: float = typer.Option(2e-2, help="Peak learning rate (Adam)."),
    weight_decay: float = typer.Option(1e-4, help="Adam's (coupled L2) weight decay."),
    warmup_epochs: float = typer.Option(1.0, help="Linear warm-up length, in epochs; cosine decay after it."),
    min_lr: float = typer.Option(1e-3, help="Learning rate at the end of the cosine."),
    seed: int = typer.Option(42, help="Seed for initialisation, order, dropout and class sampling."),
    sample_classes: float = typer.Option(1.0, help="Partial FC: fraction of the other classes used per step (1 = all)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda. \\[default: cuda when available]"),
    precision: Optional[str] = typer.Option(None, help="Class-logit matmul precision, fp32 or bf16. \\[default: bf16 on GPU, fp32 on CPU]"),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Run directory. \\[default: runs/<cache>-<loss>-<time>]"),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out from its last finished epoch."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a projection head and margin loss from cached features; defaults are the paper's recipe.

    The run directory gets config.json, metrics.jsonl (one line per epoch) and head.safetensors.
    Ctrl-C keeps the last finished epoch's head (config.json says complete: false); --resume continues.
    Load a run in Python with featcache.runs.Run.load(DIR).embed(features).
    """
    from featcache.train import TrainOptions, check_options, load_train_data, train

    dev = resolve_device(device)
    given = {"sub_centers": sub_centers, "margin": margin, "scale": scale}
    opts = {**parse_loss_opts(loss_opt), **{k: v for k, v in given.items() if v is not None}}
    options = TrainOptions(loss=loss, loss_opts=opts, embed_dim=embed_dim,
                           dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                           warmup_epochs=warmup_epochs, min_lr=min_lr, seed=seed, device=dev,
                           precision=train_precision(precision, dev), sample_classes=sample_classes)
    options.check()
    data = load_train_data(cache, dev)
    check_options(options, data)
    target = out_path or default_run_dir(cache, loss)
    bar = progress_bar("step", disable=quiet or json_out)
    with bar:
        task = bar.add_task(f"train {loss}", total=epochs * -(-len(data.labels) // batch_size))

        def on_step(info) -> None:
            last = info.step + 1 == info.steps_per_epoch
            if info.step % 50 == 0 or last:
                bar.update(task, description=f"epoch {info.epoch + 1}/{epochs} loss {float(info.loss):.3f}")
            bar.update(task, advance=1)

        result = train(data, options, target, resume=resume, overwrite=overwrite, on_step=on_step)
    report = {"run": str(target), "complete": result.complete, "epochs": result.metrics, "train_seconds": round(result.seconds, 3),
              "train_rows": len(data.labels), "classes": data.num_classes}
    if json_out:
        print_json(report)
    else:
        out.print(table(f"featcache train-head: {loss} on {len(data.labels):,} rows, {data.num_classes:,} classes",
                        ["epoch", "loss", "train acc", "lr", "seconds"],
                        [[m["epoch"], m["loss"], m["train_acc"], m["lr"], m["seconds"]] for m in result.metrics]))
        err.print(f"run: {target}\nnext: featcache eval --cache {cache} --run {target}")
    if not result.complete:
        done = len(result.metrics)
        if done:
            err.print(f"[yellow]interrupted[/] after epoch {done}: its head is in {target} (config.json complete: false); "
                      f"continue with the same command and --resume --out {target}")
        else:
            err.print(f"[yellow]interrupted[/] before the first epoch finished; run the same command with "
                      f"--resume --out {target} to start it again")
        raise typer.Exit(130)


@app.command()
@friendly_errors
def losses(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the losses with their options and defaults (margins of angular losses are in radians)."""
    from featcache.losses import LOSSES

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
    cache: Path = typer.Option(..., "--cache", "-c", help="Feature cache to train from."),
    loss: list[str] = typer.Option(["subcenter-arcface"], "--loss", "-l", help="Losses to compare (repeatable)."),
    margin: list[float] = typer.Option([], help="Margins to try (repeatable; radians for angular losses)."),
    scale: list[float] = typer.Option([], help="Scales to try (repeatable)."),
    sub_centers: list[int] = typer.Option([], help="Sub-center counts to try (repeatable)."),
    embed_dim: list[int] = typer.Option([64], help="Embedding sizes to try (repeatable)."),
    dropout: list[float] = typer.Option([0.2], help="Dropouts to try (repeatable)."),
    lr: list[float] = typer.Option([2e-2], help="Learning rates to try (repeatable)."),
    epochs: list[int] = typer.Option([10], help="Epoch counts to try (repeatable)."),
    batch_size: list[int] = typer.Option([128], help="Batch sizes to try (repeatable)."),
    weight_decay: float = typer.Option(1e-4, help="Adam's weight decay."),
    warmup_epochs: float = typer.Option(1.0, help="Warm-up epochs."),
    min_lr: float = typer.Option(1e-3, help="Final learning rate."),
    sample_classes: float = typer.Option(1.0, help="Partial FC fraction."),
    seeds: int = typer.Option(1, help="Seeds per combination (42, 43, ...): scores are mean ± std over them."),
    eval_cache: Optional[Path] = typer.Option(None, help="Cache with query/index rows to score each head on. \\[default: --cache, when it has them]"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda. \\[default: cuda when available]"),
    precision: Optional[str] = typer.Option(None, help="fp32 or bf16. \\[default: bf16 on GPU, fp32 on CPU]"),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Sweep directory. \\[default: runs/sweep-<time>]"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Train every combination of the repeated options (× seeds) from one load of the features.

    Prints final loss and, when a query/index split is available, mMP@5 as mean ± std over seeds;
    writes sweep.json and sweep.md (and one run directory per head) into the sweep directory.
    """
    from featcache.sweep import grid, run_sweep

    dev = resolve_device(device)
    combos = grid(loss, {"margin": margin, "scale": scale, "sub_centers": sub_centers},
                  {"embed_dim": embed_dim, "dropout": dropout, "lr": lr, "epochs": epochs, "batch_size": batch_size},
                  {"weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "min_lr": min_lr,
                   "sample_classes": sample_classes, "device": dev, "precision": train_precision(precision, dev)})
    import datetime as dt

    target = out_path or Path("runs") / f"sweep-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    bar = progress_bar("run", disable=quiet or json_out)
    with bar:
        task = bar.add_task("sweep", total=len(combos) * seeds)
        try:
            summary = run_sweep(cache, combos, seeds, target, eval_cache,
                                on_run=lambda name: bar.update(task, advance=1, description=name))
        except KeyboardInterrupt:
            err.print(f"[yellow]interrupted[/]: the finished combinations are in {target / 'sweep.json'}")
            raise typer.Exit(130) from None
    if json_out:
        print_json(summary)
        return
    out.print(summary_table(summary))
    err.print(f"wrote {target / 'sweep.json'} and {target / 'sweep.md'}")


def summary_table(summary: dict):
    metric = summary.get("metric")
    cols = ["loss", "options", "final loss", "train acc", *([metric] if metric else []), "seconds"]
    rows = []
    for r in summary["results"]:
        rows.append([r["loss"], r["label"], r["final_loss"], r["train_acc"], *([r.get(metric, "-")] if metric else []), r["seconds"]])
    return table(f"featcache sweep ({summary['seeds']} seed{'s' if summary['seeds'] > 1 else ''} each)", cols, rows, justify_numbers=False)


# ---------------------------------------------------------------------------------------------
# Stage three: eval, runs, demo


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise UserError(f"--max-memory {text!r}: expected a size like 2GB, 512MB or a number of bytes")
    return int(float(m.group(1)) * 1024 ** "BKMGT".index(m.group(2) or "B"))


class Protocol(str, Enum):
    guiec = "guiec"
    uned = "uned"


class ZeroShot(str, Enum):
    pooled = "pooled"
    raw = "raw"


def scores_table(title: str, results: dict[str, dict], k: int):
    names = list(results)
    first = results[names[0]]
    metrics = [f"mMP@{k}", f"mAP@{k}", "R@1"]
    cols = ["domain", "queries", *[f"{m} {n}" if len(names) > 1 else m for m in metrics for n in names]]
    rows = []
    for dom in ["overall", *first["domains"]]:
        pick = (lambda r: r["overall"]) if dom == "overall" else (lambda r, d=dom: r["domains"].get(d, {}))
        rows.append([dom, pick(first).get("queries"), *[pick(results[n]).get(m) for m in metrics for n in names]])
    return table(title, cols, rows)


@app.command(name="eval", epilog="Example: featcache eval --cache cache/demo/tiny-vit.zarr --run runs/demo --plot runs/demo/plots")
@friendly_errors
def eval_(
    cache: Optional[Path] = typer.Option(None, "--cache", "-c", help="Cache whose query/index rows (or all rows) are scored."),
    run: Optional[Path] = typer.Option(None, "--run", "-r", help="A train-head run directory: its head makes the embeddings."),
    zero_shot: Optional[ZeroShot] = typer.Option(None, help="No head: 'pooled' (feature averaged to 64 dims, the paper's baseline) or 'raw'. [default when no --run: pooled]"),
    protocol: Protocol = typer.Option(Protocol.guiec, help="guiec: same label is relevant, mean over queries. uned: same label and domain, mean over domains."),
    query_cache: Optional[Path] = typer.Option(None, help="Queries from this cache (all valid rows) instead of --cache's query split."),
    index_cache: Optional[Path] = typer.Option(None, help="Index from this cache (all valid rows)."),
    k: int = typer.Option(5, min=1, help="Neighbours scored per query (the @5)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the scores to this JSON file."),
    plot: Optional[Path] = typer.Option(None, help="Write neighbours.png and domains.png into this folder."),
    max_memory: str = typer.Option("2GB", help="Bound on the search's temporary memory."),
) -> None:
    """Score retrieval: mMP@k (GUIEC), mAP@k (UnED) and R@1, overall and per domain, by exact search.

    Without query/index splits every valid row is a query against all the others (itself excluded).
    A domain with query rows but no index rows is its own index: its queries search each other, each
    skipping itself (UnED's cars, SOP, iNat, Food2k, RP2K). A run's scores are also stored in its
    directory, where `featcache runs` shows them.
    """
    from featcache.evaluate import EvalSet, run_eval

    mem = parse_bytes(max_memory)
    es = EvalSet.load(cache, query_cache, index_cache)
    ev = run_eval(run=run, zero_shot=zero_shot.value if zero_shot else None, protocol=protocol.value, k=k,
                  max_memory=mem, show=8 if plot else 0, eval_set=es)
    results = {("run" if run else (zero_shot.value if zero_shot else "pooled")): ev.result}
    if plot and run is not None:
        results["zero-shot"] = run_eval(zero_shot="pooled", protocol=protocol.value, k=k, max_memory=mem, eval_set=es).result
    out.print(scores_table(f"featcache eval ({protocol.value}, {ev.result['embeddings']})", results, k))
    excluded = ev.result["overall"]["excluded"]
    if excluded:
        err.print(f"{excluded} queries have no relevant index row and are not scored.")
    if json_file:
        from featcache.runs import write_json

        json_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_file, ev.result)
    if plot:
        from featcache.plots import domain_scores, neighbours_grid

        files = [neighbours_grid(ev, plot / "neighbours.png"), domain_scores(results, plot / "domains.png", f"mMP@{k}")]
        err.print("plots: " + ", ".join(str(f) for f in files))


@app.command()
@friendly_errors
def runs(
    folder: Path = typer.Argument(Path("runs"), help="Where to look for run directories (searched recursively)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List trained runs: loss, key options, epochs, training time and the latest mMP@5, to compare at a glance."""
    from featcache.runs import list_runs

    rows = list_runs(folder)
    if json_out:
        print_json(rows)
        return
    if not rows:
        err.print(f"no runs under {folder}; train one with `featcache train-head`")
        return
    out.print(table(f"runs under {folder}", ["run", "loss", "options", "epochs", "train s", "mMP@5", "status"],
                    [[r["run"], r["loss"], r["options"], r["epochs"], r["train_seconds"], r["mMP@5"], r["status"]] for r in rows],
                    justify_numbers=False))


@app.command()
@friendly_errors
def demo(
    model: str = typer.Option("tiny-vit", "--model", "-m", help="Backbone (any `featcache models` name)."),
    weights: Optional[Path] = typer.Option(None, help="Local checkpoint for --model (e.g. SigLIP's, to see real numbers)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda. \\[default: cuda when available]"),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Run the whole pipeline offline on scikit-learn's bundled handwritten digits.

    Digits 0-5 train the head; digits 6-9, never seen in training, are split into query and index.
    Writes images and manifest under manifests/demo/, the cache under cache/demo/, the run and plots
    under runs/demo/, and prints zero-shot and trained scores side by side.
    """
    from featcache.demo import run_demo

    run_demo(model, weights, resolve_device(device), json_out=json_out)

@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True)) -> None:
    if version:
        out.print(f"featcache {__version__}")
        raise typer.Exit()


def main() -> None:
    app()

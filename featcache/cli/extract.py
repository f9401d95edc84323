"""``featcache models``, ``extract``, ``info`` and ``import``: stage one on the command line."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from featcache.cli.console import (
    UserError,
    allow_break_lock,
    break_lock_flag,
    err,
    flag,
    friendly_errors,
    human_bytes,
    out,
    place,
    print_json,
    progress_bar,
    table,
)

app = typer.Typer()

DEFAULT_CACHE_ROOT = Path("cache")


class DType(str, Enum):
    float16 = "float16"
    float32 = "float32"


class Augment(str, Enum):
    flip = "flip"
    openclip = "openclip"
    siglip = "siglip"
    custom = "custom"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def default_cache_path(manifest: Path, model: str) -> Path:
    from featcache.cache import safe_name

    return DEFAULT_CACHE_ROOT / manifest.stem / f"{safe_name(model)}.zarr"


@app.command()
@friendly_errors
def models(json_out: bool = flag("--json", help="Print JSON instead of a table.")) -> None:
    """List the backbone registry: short name, source, output dim, image size, vision parameters.

    Any other open_clip or timm model works too, as [bold]open_clip:ARCH\\[@TAG][/] or [bold]timm:NAME[/].
    """
    from featcache.extract.backbones import describe_registry

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
    manifest: str = typer.Option(..., "--manifest", help="CSV with columns path,label[,domain,split,x1,y1,x2,y2] (a path or an s3://, gs:// URL)."),
    root: Optional[str] = typer.Option(None, help="Folder (or URL) the manifest's relative paths start from. \\[default: the manifest's folder]"),
    weights: Optional[Path] = typer.Option(None, help="Local checkpoint file to load instead of downloading the pretrained weights."),
    out_path: Optional[str] = typer.Option(None, "--out", help="Cache to write: a folder, or an s3:// or gs:// URL. \\[default: cache/<manifest stem>/<model>.zarr]"),
    dtype: DType = typer.Option(DType.float16, help="Storage type of the features."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass (with --views, batch-size // (1 + V) rows, each with its 1 + V images)."),
    workers: Optional[int] = typer.Option(None, min=0, help="DataLoader processes that decode images. \\[default: all cores on GPU, half on CPU]"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda[:N]. \\[default: cuda when available]"),
    precision: Optional[Precision] = typer.Option(None, help="Autocast precision of the model. \\[default: bf16 on GPU, fp32 on CPU]"),
    chunk_rows: Optional[int] = typer.Option(None, min=1, help="Rows per Zarr chunk, the unit of resume. \\[default: about 4 MB per chunk]"),
    overwrite: bool = flag(help="Replace an existing cache at --out, even a different one."),
    retry_failed: bool = flag("--retry-failed", help="Read the rows that failed again (after fixing the files, or from another --root)."),
    views: Optional[int] = typer.Option(None, "--views", min=1, help="Also store V augmented views of every image (array `augmented`, for `train-head --views`); needs --augment. \\[default: 1 with --augment]"),
    augment: Optional[Augment] = typer.Option(None, "--augment", help="How the views are made: flip (the mirrored image, one view), openclip (random square crop of 90-100 % of the area), siglip (random 8-100 % crop + colour jitter 0.6-1.4), custom (the openclip crop, a random flip, the jitter)."),
    break_lock: bool = break_lock_flag(),
    quiet: bool = flag("--quiet", "-q", help="No progress bar."),
    json_out: bool = flag("--json", help="Print the summary as JSON."),
) -> None:
    """Run a frozen backbone once over a manifest's images and store the embeddings in a Zarr cache.

    Interrupted runs (Ctrl-C, a kill, a crash) continue where they stopped: run the same command again.
    Images that are missing or cannot be decoded do not stop the run; they become failure rows
    (see [bold]featcache info[/]). Under [bold]torchrun --nproc-per-node N -m featcache extract ...[/]
    every rank writes its own chunks of the same store.

    With [bold]--views V --augment NAME[/] each image is also augmented V times (each view from its own
    seed, so resumed and torchrun runs write the same views) and embedded beside its clean features:
    training-time augmentation for [bold]train-head --views[/] without running the backbone every epoch.
    """
    from featcache.devices import default_precision, default_workers, resolve_device
    from featcache.extract.augment import Augmentation
    from featcache.extract.backbones import create_backbone
    from featcache.extract.pipeline import Dist, Progress, run_extract
    from featcache.manifest import read_manifest

    dist = Dist.from_env()
    dev = dist.local_device(resolve_device(device))
    prec = precision.value if precision else default_precision(dev)
    workers = default_workers(dev) if workers is None else workers
    if views is not None and augment is None:
        raise UserError(f"--views {views}: say how the views are made with --augment {'|'.join(a.value for a in Augment)}")
    augmentation = Augmentation(augment.value, views or 1) if augment else None
    allow_break_lock(break_lock)
    manifest = place(manifest)
    m = read_manifest(manifest, root)
    target = place(out_path) or default_cache_path(manifest, model)
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
                                     device=dev, precision=prec, chunk_rows=chunk_rows, overwrite=overwrite, retry_failed=retry_failed,
                                     augmentation=augmentation, progress=Progress(update=update), dist=dist)
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
        "augmentation": summary["augmentation"],
        "key": summary["key"],
        "bytes_on_disk": summary["bytes_on_disk"],
    }
    if json_out:
        print_json(report)
        return
    if result.skipped:
        err.print(f"{target} is already complete for this manifest and model: nothing to do.", markup=False)
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
        *([["augmented views", _views_text(summary)]] if summary["augmentation"] else []),
        ["size on disk", human_bytes(report["bytes_on_disk"])],
    ]
    out.print(table("featcache extract", ["", "value"], rows))
    if report["failed"]:
        err.print(f"{report['failed']} images failed; `featcache info {target}` lists them.", markup=False)


def _views_text(summary: dict) -> str:
    a = summary["augmentation"]
    return f"{summary['rows']:,} x {a['views']} x {summary['dim']} ({a['augment']}, seed {a.get('seed', 0)})"


def _report_interrupted(target) -> None:
    try:
        from featcache.cache import FeatureCache

        done = FeatureCache.open(target).chunk_done()
        err.print(f"[yellow]interrupted:[/] {int(done.sum())} of {done.size} chunks are done in {escape(str(target))}; "
                  "run the same command again to continue.")
    except Exception:
        err.print("[yellow]interrupted[/] before the cache was created.")


@app.command()
@friendly_errors
def info(
    cache: str = typer.Argument(..., help="A cache written by `featcache extract` or `featcache import` (a folder or a URL)."),
    verify: bool = flag("--verify", help="Read every chunk and check its crc32c (a full read of the cache)."),
    json_out: bool = flag("--json", help="Print JSON instead of tables."),
) -> None:
    """Show a cache's provenance, rows per split and domain, failures, damaged chunks, and size on disk.

    Chunk files that are missing or of the wrong size are always reported; --verify also reads every
    chunk, to find the ones whose bytes changed. Re-running the `featcache extract` command that made
    the cache redoes exactly the damaged chunks. Exit status 1 when a chunk is damaged.
    """
    from featcache.cache import FeatureCache

    c = FeatureCache.open(cache)
    s = c.summary()
    if verify:
        s["damaged_chunks"] = [f"{p.file} ({p.reason})" for p in c.chunk_problems(read=True)]
        s["verified"] = True
    if json_out:
        print_json(s)
        if s["damaged_chunks"]:
            raise typer.Exit(1)
        return
    b = s["backbone"]
    status = "complete" if s["complete"] else f"INCOMPLETE ({s['chunks_done']} of {s['chunks']} chunks done)"
    if s["damaged_chunks"]:
        status = f"DAMAGED: {len(s['damaged_chunks'])} chunk file(s); run the extract command again to redo them"
    elif verify:
        status += ", every chunk verified (crc32c)"
    out.print(table(f"{cache}", ["", "value"], [
        ["status", status],
        ["key", s["key"]],
        ["backbone", f"{b['name']} ({b['library']}:{b['arch']}{'@' + b['pretrained'] if b.get('pretrained') and b['library'] == 'open_clip' else ''})"],
        ["weights", b["weights"]],
        ["preprocessing", ", ".join(f"{k}={v}" for k, v in s["preprocessing"].items() if k != "library")],
        ["precision", s["precision"]],
        ["features", f"{s['rows']:,} x {s['dim']} {s['dtype']}"],
        *([["augmented views", _views_text(s)]] if s["augmentation"] else []),
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
                      "read the `failures` array for all).", markup=False)
    if s["damaged_chunks"]:
        out.print(table(f"damaged chunks ({len(s['damaged_chunks'])})", ["file (reason)"],
                        [[d] for d in s["damaged_chunks"]], justify_numbers=False))
        raise typer.Exit(1)


@app.command("import")
@friendly_errors
def import_(
    features: str = typer.Option(..., "--features", help="A .npy array (rows, dim), row i for manifest row i; or a folder in the LAION layout (img_emb/img_emb_{i}.npy + metadata/metadata_{i}.parquet), matched by image_path."),
    manifest: str = typer.Option(..., "--manifest", help="The manifest the rows come from."),
    root: Optional[str] = typer.Option(None, help="Folder the manifest's relative paths start from (to match absolute image_path values). \\[default: the manifest's folder]"),
    out_path: str = typer.Option(..., "--out", help="Cache to write (a folder or a URL)."),
    dtype: DType = typer.Option(DType.float16, help="Storage type of the features."),
    chunk_rows: Optional[int] = typer.Option(None, min=1, help="Rows per Zarr chunk. \\[default: about 4 MB per chunk]"),
    space: Optional[str] = typer.Option(None, help="Name the kind of vectors these are (e.g. 'clip-vit-l14 openai'): caches imported with the same --space compare with each other. \\[default: a featcache embeddings folder's own record, else these vectors only]"),
    overwrite: bool = flag(help="Replace an existing cache at --out."),
    break_lock: bool = break_lock_flag(),
    json_out: bool = flag("--json", help="Print the cache's attributes as JSON."),
) -> None:
    """Build a cache from embeddings computed elsewhere, so the rest of featcache can use them.

    From a .npy array, row i is manifest row i. From a folder in the LAION ecosystem's layout (what
    clip-retrieval and `featcache export-embeddings` write), rows are matched to the manifest by
    image_path, in any order and any number of shards; manifest rows without an embedding become
    invalid rows, and embeddings of paths not in the manifest are counted. Rows that are not finite
    become invalid rows too; the command says how many.

    Vectors are compared only with vectors of the same space: an export-embeddings folder says which
    backbone (and head) made it, so its import compares with that backbone's caches and runs; for
    other sources, give the same --space to every import of one model's vectors.

    Example: featcache import --features feats.npy --manifest train.csv --out cache/train/mine.zarr
    """
    from featcache.manifest import read_manifest

    allow_break_lock(break_lock)
    features, out_path = place(features), place(out_path)
    m = read_manifest(manifest, root)
    if features.is_dir():
        from featcache.deploy.embeddings import import_embeddings

        meta = import_embeddings(features, m, out_path, dtype=dtype.value, chunk_rows=chunk_rows, overwrite=overwrite,
                                 space=space)
    else:
        from featcache.cache import import_npy

        meta = import_npy(features, m, out_path, dtype=dtype.value, chunk_rows=chunk_rows, overwrite=overwrite,
                          space=space)
    if json_out:
        print_json(meta)
        return
    out.print(f"wrote {out_path}: {meta['rows']:,} x {meta['dim']} {meta['dtype']} (key {meta['key']})", markup=False)
    if "matched" in meta:
        err.print(f"matched {meta['matched']:,} manifest rows; {meta['missing']:,} have no embedding in {features} "
                  f"(invalid rows); {meta['extra']:,} embeddings name paths that are not in {manifest}", markup=False)
    if meta["non_finite"]:
        err.print(f"{meta['non_finite']:,} rows hold NaN or infinite values: stored as invalid rows "
                  f"(`featcache info {out_path}` lists them)", markup=False)

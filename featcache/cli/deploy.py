"""``featcache export``, ``index``, ``search`` and ``export-embeddings``: the trained model outside featcache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from featcache.cli.evaluate import ZeroShot
from featcache.cli.console import (
    allow_break_lock, break_lock_flag, err, flag, friendly_errors, human_bytes, out, place, print_json, progress_updates, table,
)

app = typer.Typer()


@app.command(epilog="Example: featcache export --run runs/paper --weights open_clip_pytorch_model.bin --out submission.zip")
@friendly_errors
def export(
    run: str = typer.Option(..., "--run", "-r", help="A finished train-head run directory (a folder or a URL)."),
    out_path: Path = typer.Option(..., "--out", help="Model file; its suffix picks the format: .pt (TorchScript), .zip (GUIEC submission), .onnx."),
    weights: Optional[Path] = typer.Option(None, help="The backbone's weights file; its sha256 must be the one the run's cache recorded. \\[needed when the cache was extracted from a local file]"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda: where the model is traced. \\[default: cpu]"),
    precision: str = typer.Option("fp32", help="Weights of the exported model: fp32, fp16 or bf16."),
    overwrite: bool = flag(help="Replace a model featcache exported at --out before."),
    json_out: bool = flag("--json", help="Print the result as JSON."),
) -> None:
    """Export a trained run as one model file: the backbone, rebuilt exactly as its cache recorded it, joined with the head.

    [bold].pt[/]: TorchScript; takes (B, 3, H, W) RGB images, float 0..255 or uint8, any size; does the
    backbone's own preprocessing inside and returns L2-normalised embeddings. Needs torch alone.
    [bold].zip[/]: the GUIEC submission (saved_model.pt inside; at most 64 dims).
    [bold].onnx[/]: the preprocessed (B, 3, S, S) input, with NAME.preprocess.json beside it.
    Ends with a self-check on a probe image against the eager pipeline.
    """
    from featcache.deploy.export import export as run_export, sidecar
    from featcache.devices import resolve_device

    run = place(run)

    result = run_export(run, out_path, weights=weights, device=resolve_device(device or "cpu"), precision=precision,
                        overwrite=overwrite)
    report = {"out": str(result.path), "format": result.format, "bytes": result.bytes, "dim": result.dim,
              "self_check": result.check}
    if result.format == ".onnx":
        report["preprocess"] = str(sidecar(result.path))
    if json_out:
        print_json(report)
        return
    check = result.check
    agreement = f"cosine {check['cosine']:.6f}" if "cosine" in check else f"max |diff| {check['max_abs_diff']:.2e}"
    out.print(f"wrote {result.path} ({human_bytes(result.bytes)}, {result.dim}-d embeddings)", markup=False)
    err.print(f"self-check: {agreement} against the pipeline on a {check['probe']} (needs "
              f"{'>=' if 'cosine' in check else '<='} {check['floor']})", markup=False)


@app.command(epilog="Example: featcache index --cache cache/demo/tiny-vit.zarr --run runs/demo --out runs/demo/index")
@friendly_errors
def index(
    cache: str = typer.Option(..., "--cache", "-c", help="The collection: every valid row of this cache (a folder or a URL)."),
    run: Optional[str] = typer.Option(None, "--run", "-r", help="Embed the rows with this run's head. \\[default: the raw features]"),
    out_path: str = typer.Option(..., "--out", help="Index directory to write: a folder, or an s3:// or gs:// URL."),
    ivf: Optional[int] = typer.Option(None, help="An IVF index with this many lists instead of exact search."),
    nprobe: Optional[int] = typer.Option(None, help="IVF lists searched per query. \\[default: lists / 16]"),
    hnsw: Optional[int] = typer.Option(None, help="An HNSW graph with this many links per node instead of exact search."),
    factory: Optional[str] = typer.Option(None, help="Any faiss index_factory string, e.g. IVF65536,PQ32 or OPQ16_64,IVF262144_HNSW32,PQ16: a compressed index for collections that do not fit in memory, trained on a sample and filled block by block; `search` reads it memory-mapped."),
    max_memory: str = typer.Option("8GB", help="Refuse, before starting, an index whose build needs more memory than this (the index, its training sample, one block)."),
    overwrite: bool = flag(help="Replace an index already at --out."),
    break_lock: bool = break_lock_flag(),
    json_out: bool = flag("--json", help="Print index.json's content as JSON."),
) -> None:
    """Build a faiss index of a cache's rows (L2-normalised, inner product) for `featcache search`.

    Exact (flat) by default; --ivf, --hnsw or --factory build an approximate index and report its
    recall@10 against exact search on a sample of the rows. The memory the build needs is printed before it
    starts, and a build above --max-memory is refused.
    """
    from featcache.deploy.index import build_index, index_spec

    from featcache.cli.evaluate import parse_bytes

    spec = index_spec(ivf, hnsw, nprobe, factory)
    allow_break_lock(break_lock)
    cache, run, out_path = place(cache), place(run), place(out_path)

    def say_plan(plan: dict) -> None:
        if not json_out:
            err.print(f"{spec.factory or spec.kind}: about {human_bytes(plan['index'])} of index ({plan['per_vector']} bytes "
                      f"a vector) + {human_bytes(plan['training'])} of training sample ({plan['training_rows']:,} rows) + "
                      f"{human_bytes(plan['block'])} a block", markup=False)

    with progress_updates(f"index ({spec.factory or spec.kind})", disable=json_out) as update:
        meta = build_index(cache, out_path, run=run, spec=spec, overwrite=overwrite, progress=update,
                           max_memory=parse_bytes(max_memory), on_plan=say_plan)
    if json_out:
        print_json(meta)
        return
    rows = [["index", str(out_path)], ["kind", ", ".join(f"{k}={v}" for k, v in meta["index"].items())],
            ["rows", meta["rows"]], ["dim", meta["dim"]], ["embeddings", f"run {meta['run']}" if meta["run"] else "raw features"]]
    if meta["recall_at_10"] is not None:
        rows.append(["recall@10 vs exact", f"{meta['recall_at_10']:.4f} ({meta['recall_sample']} sampled rows)"])
    out.print(table("featcache index", ["", "value"], rows))


@app.command(epilog="Example: featcache search --index runs/demo/index manifests/demo/images/digit7_0007.png --k 5")
@friendly_errors
def search(
    images: Optional[List[str]] = typer.Argument(None, help="Query images (files or URLs)."),
    index_dir: Optional[str] = typer.Option(None, "--index", "-i", help="An index written by `featcache index` (a folder or a URL)."),
    index_cache: List[str] = typer.Option([], "--index-cache", metavar="CACHE", help="Instead of --index: search these caches' valid rows exactly, streamed block by block (no index is built; repeatable; with --query-cache)."),
    run: Optional[str] = typer.Option(None, "--run", "-r", help="With --index-cache: embed both sides with this run's head. \\[default: --zero-shot]"),
    zero_shot: Optional[ZeroShot] = typer.Option(None, "--zero-shot", help="With --index-cache and no --run: 'raw' (the caches' vectors as they are) or 'pooled' (averaged to 64 dims, eval's baseline). \\[default: raw]"),
    max_memory: str = typer.Option("2GB", help="With --index-cache: bound on the search's memory; a larger index is streamed from disk."),
    k: int = typer.Option(10, "--k", min=1, help="Neighbours per query."),
    weights: Optional[Path] = typer.Option(None, help="The backbone's weights file, when the index's cache was extracted from one."),
    model: Optional[Path] = typer.Option(None, help="Embed the queries with this `featcache export` .pt (or .zip) instead of rebuilding backbone and head."),
    query_cache: Optional[str] = typer.Option(None, help="Search with every valid row of this cache instead of image files."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda. \\[default: cuda when available]"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write {queries: [{query, neighbours: [{path, label, domain, score}]}]} to this file."),
    plot: Optional[Path] = typer.Option(None, help="Draw each query (the first 16) beside its neighbours (the first 10) into this PNG."),
    overwrite: bool = flag(help="Replace the --json file or --plot picture featcache wrote there before."),
    quiet: bool = flag("--quiet", "-q", help="No tables (with --json or --plot)."),
) -> None:
    """Find an index's nearest rows to query images, embedded exactly as the index's rows were.

    Prints a table per query (rank, cosine score, path, label). An image that cannot be read gives one
    line and the others go on. With --index-cache instead of --index, the rows of --query-cache are searched
    against caches directly, exactly and block by block from disk (one cache or several, of any size).
    """
    from featcache.deploy.index import Index, search_cache, search_caches, search_images
    from featcache.devices import resolve_device

    from featcache.evaluate.plots import is_our_png
    from featcache.files import check_file_replaceable, is_featcache_json

    from featcache.cli.evaluate import parse_bytes

    index_dir, query_cache, run = place(index_dir), place(query_cache), place(run)
    index_cache = [place(c) for c in index_cache]
    if bool(images) == (query_cache is not None):
        raise typer.BadParameter("give query IMAGE files or --query-cache, not both (and not neither)")
    if (index_dir is None) == (not index_cache):
        raise typer.BadParameter("give --index DIR or --index-cache CACHE (repeatable), one of them")
    if index_cache and query_cache is None:
        raise typer.BadParameter("--index-cache searches with --query-cache; to search by image, build an index "
                                 "(`featcache index`) and give --index")
    if (run is not None or zero_shot is not None) and not index_cache:
        raise typer.BadParameter("--run and --zero-shot go with --index-cache; an index embeds its queries with its own head")
    if run is not None and zero_shot is not None:
        raise typer.BadParameter("give --run or --zero-shot, not both")
    if index_cache and (weights is not None or model is not None or device is not None):
        raise typer.BadParameter("--weights, --model and --device embed query images; --index-cache searches the "
                                 "features cached already")
    mem = parse_bytes(max_memory)
    for file, ours, what, option in ((json_file, is_featcache_json, "search results", "--json"),
                                     (plot, is_our_png, "a featcache picture", "--plot")):
        if file is not None:  # refused before the search, not after it
            check_file_replaceable(file, ours, what, overwrite, option)
    idx = Index.open(index_dir) if index_dir is not None else None
    failures: list[str] = []
    if index_cache:
        results = search_caches(query_cache, index_cache, run=run, zero_shot=zero_shot.value if zero_shot else "raw", k=k, max_memory=mem)
    elif query_cache is not None:
        results = search_cache(idx, query_cache, k=k)
    else:
        results, failures = search_images(idx, images, k=k, weights=weights, device=resolve_device(device), model=model)
    for f in failures:
        err.print(f"[yellow]skipped[/] {escape(str(f))}", highlight=False)
    if not quiet:
        for r in results[:20]:
            out.print(table(f"query {shown(r['query'])}", ["rank", "score", "path", "label"],
                            [[i + 1, n["score"], shown(n["path"]), n["label"]] for i, n in enumerate(r["neighbours"])],
                            justify_numbers=False))
        if len(results) > 20:
            err.print(f"... and {len(results) - 20:,} more queries (--json writes them all)", markup=False)
    if json_file:
        from featcache import __version__
        from featcache.files import write_user_json
        from featcache.storage import absolute

        searched = absolute(idx.path, resolve=True) if idx is not None else [absolute(c, resolve=True) for c in index_cache]
        write_user_json(json_file, {"featcache_version": __version__, "index": searched, "queries": results},
                        what="search results", overwrite=overwrite)
        err.print(f"wrote {json_file}", markup=False)
    if plot:
        from featcache.evaluate.plots import search_grid

        err.print(f"wrote {search_grid(results[:16], plot, overwrite)}", markup=False)
    if failures and not results:
        raise typer.Exit(1)


def shown(path: str) -> str:
    """A path as a table shows it: relative to the working directory when it is below it (--json keeps the
    absolute path)."""
    rel = os.path.relpath(path) if os.path.isabs(path) else path
    return path if rel.startswith("..") else rel


@app.command("export-embeddings", epilog="Example: featcache export-embeddings --cache cache/demo/tiny-vit.zarr --run runs/demo --out embeddings/demo")
@friendly_errors
def export_embeddings(
    cache: str = typer.Option(..., "--cache", "-c", help="The cache whose valid rows are written (a folder or a URL)."),
    run: Optional[str] = typer.Option(None, "--run", "-r", help="Write this run's L2-normalised head embeddings. \\[default: the raw features]"),
    out_path: str = typer.Option(..., "--out", help="Folder (or s3://, gs:// URL) to write img_emb/ and metadata/ into."),
    shard_rows: int = typer.Option(1_000_000, min=1, help="Rows per shard."),
    overwrite: bool = flag(help="Replace embeddings that featcache wrote at --out before."),
    break_lock: bool = break_lock_flag(),
    json_out: bool = flag("--json", help="Print the result as JSON."),
) -> None:
    """Write embeddings in the LAION ecosystem's layout (clip-retrieval's; embedding-reader and autofaiss read it).

    DIR/img_emb/img_emb_{i}.npy and DIR/metadata/metadata_{i}.parquet (image_path, label, domain, split),
    shard i of both row-aligned. `featcache import --features DIR` reads it back.
    """
    from featcache.deploy.embeddings import export_embeddings as write

    allow_break_lock(break_lock)
    cache, run, out_path = place(cache), place(run), place(out_path)

    with progress_updates("export-embeddings", disable=json_out) as update:
        record = write(cache, out_path, run=run, shard_rows=shard_rows, overwrite=overwrite, progress=update)
    if json_out:
        print_json(record)
        return
    out.print(f"wrote {out_path}: {record['rows']:,} x {record['dim']} {record['dtype']} ({record['embeddings']}) "
              f"in {record['shards']} shard(s)", markup=False)

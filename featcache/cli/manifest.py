"""``featcache manifest``: build manifests from source datasets, curate them, check them."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from featcache.cli.console import UserError, err, flag, friendly_errors, out, place, print_json, progress_bar, table
from featcache.manifest.builders import BUILDERS
from featcache.manifest.builders import build as build_rows
from featcache.manifest.builders.common import recording_reads
from featcache.manifest.schema import Rows, check_manifest_out, file_ids
from featcache.storage import Remote

manifest_app = typer.Typer(
    help=(
        "Build, curate and check manifests: the CSV lists of images (path,label,domain,split) that "
        "every stage starts from.\n\n"
        "[bold]build[/] one source dataset -> [bold]curate[/] (min/max per class) -> [bold]check[/] "
        "before extracting; [bold]recipe[/] does build + curate for a whole training set (M4D-35k)."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)

Source = Enum("Source", {name: name for name in BUILDERS}, type=str)

OVERWRITE_HELP = ("Replace --out when it is a manifest featcache wrote (never any other file, nor a file this "
                  "command reads).")


def _note(message: str) -> None:
    err.print(f"[yellow]note:[/] {message}", highlight=False)


def _counts_table(title: str, before: Rows | None, after: Rows) -> None:
    from featcache.manifest.curate import domain_counts

    a = domain_counts(after)
    if before is None:
        rows = [[d, c.classes, c.images] for d, c in a.items()]
        rows.append(["total", sum(c.classes for c in a.values()), len(after)])
        out.print(table(title, ["domain", "classes", "images"], rows))
        return
    b = domain_counts(before)
    rows = []
    for d in sorted(set(b) | set(a)):
        cb, ca = b.get(d), a.get(d)
        rows.append([d, cb.classes if cb else 0, cb.images if cb else 0, ca.classes if ca else 0, ca.images if ca else 0])
    rows.append(["total", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows), sum(r[4] for r in rows)])
    out.print(table(title, ["domain", "classes before", "images before", "classes after", "images after"], rows))


def _build_help() -> str:
    from rich.markup import escape

    sources = "\n\n".join(f"[bold]{b.name}[/]: {escape(b.summary)}; reads {escape(b.layout)}" for b in BUILDERS.values())
    return (
        "Turn one source dataset's own annotation files into a manifest.\n\n" + sources + "\n\n"
        "Labels are prefixed with the domain (products/1234), so datasets never share a class when manifests are "
        "combined. Sources with item boxes (food-rec22, deepfashion2, stanford-cars) write them as x1,y1,x2,y2: "
        "extract crops each row from its image.\n\n"
        "Example:\n\n    featcache manifest build gldv2 --root data/gldv2 --out manifests/gldv2.csv\n\n"
        "    featcache manifest build uned --root data/uned --partition test --out manifests/uned-test.csv"
    )


@manifest_app.command(help=_build_help())
@friendly_errors
def build(
    source: Source = typer.Argument(..., help="Which dataset's annotation files to read (see the list above)."),
    root: str = typer.Option(..., "--root", help="The dataset's folder as downloaded; manifest paths are relative to it (webdataset: also an s3:// or gs:// URL)."),
    out_path: str = typer.Option(..., "--out", help="Manifest CSV to write, a file or a URL (columns path,label,domain,split[,x1,y1,x2,y2])."),
    domain: Optional[str] = typer.Option(
        None, "--domain", help="Domain name, also the label prefix (each source's default is in its summary above; "
        "imagefolder: the folder's name). For uned: which UnED domains, e.g. cars,sop (default all 8)."),
    partition: Optional[str] = typer.Option(
        None, "--partition", help="deepfashion-c2s: evaluation statuses, e.g. train,val (default train). "
        "stanford-cars, sop, rp2k and fashion200k: train and/or test (default train). deepfashion2: train and/or validation "
        "(default train). food101: test and/or train (default test, as the paper's training). uned: train, val or test "
        "(default test)."),
    annotations: Optional[str] = typer.Option(
        None, "--annotations", help="gldv2: train.csv (id,url,landmark_id) or train_clean.csv (landmark_id,images); "
        "default train.csv when present. m4d-35k, furniture180, storefronts146, food-rec22: the list's file name "
        "(defaults m4d-35k_train.csv, furniture180_train.csv, storefronts146_train.csv, annotations.json)."),
    colors: Optional[Path] = typer.Option(
        None, "--colors", help="stanford-cars: CSV of image,colour pairs; classes become model x colour."),
    info_dir: Optional[Path] = typer.Option(
        None, "--info-dir", help="uned: folder of the split files (default ROOT/info_files)."),
    shards: Optional[str] = typer.Option(
        None, "--shards", help="webdataset: the shards under ROOT, a brace pattern like '{00000..00999}.tar' (default every *.tar in ROOT)."),
    label: Optional[str] = typer.Option(
        None, "--label", help="webdataset: each sample's label: cls or txt (that member's text), or a key of its json "
        "(or a column of img2dataset's parquet beside the shard, read instead of the tar when it has it); __key__: each sample "
        "its own class (distractors)."),
    overwrite: bool = flag("--overwrite", help=OVERWRITE_HELP),
) -> None:
    root, out_path = place(root), place(out_path)
    if isinstance(root, Remote) and source.value != "webdataset":
        raise UserError(f"--root {root}: only the webdataset builder reads an object store; {source.value} reads a "
                        "local copy of the dataset")
    _refuse_foreign_out(out_path, [colors] if colors else [])
    with recording_reads() as reads:
        rows = build_rows(source.value, root, domain=domain, partition=partition, annotations=annotations,
                          colors=colors, info_dir=info_dir, shards=shards, label=label)
    for n in rows.notes:
        _note(n)
    rows.write(out_path, overwrite=overwrite, reads=reads)
    splits = {s: rows.splits.count(s) for s in ("train", "query", "index") if s in set(rows.splits)}
    _counts_table(f"{source.value} -> {out_path}", None, rows)
    if set(splits) != {"train"}:
        out.print("splits: " + ", ".join(f"{s} {n:,}" for s, n in splits.items()))
    _root_hint(out_path, root)


def _refuse_foreign_out(out: Path, inputs) -> dict:
    """Before any work: refuse an --out that no --overwrite could allow (a file featcache did not make, or one of
    ``inputs``). Whether an earlier manifest there may be replaced is asked when writing (``Rows.write``), after
    the inputs were found sound. Returns the inputs' file ids."""
    reads = file_ids(inputs)
    check_manifest_out(out, overwrite=True, reads=reads)
    return reads


def _root_hint(manifest: Path, root: Path) -> None:
    """Paths are relative to the dataset folder; say so when the manifest lives elsewhere."""
    if manifest.resolve().parent != root.resolve():
        out.print(f"paths are relative to {root}: give [bold]--root {root}[/] to check and extract.", highlight=False)


@manifest_app.command()
@friendly_errors
def curate(
    inputs: List[str] = typer.Argument(..., help="Manifests to combine, files or URLs (paths are copied as written: give manifests with one root)."),
    out_path: str = typer.Option(..., "--out", help="Curated manifest CSV to write (a file or a URL)."),
    min_per_class: int = typer.Option(3, "--min-per-class", help="Drop classes with fewer images than this."),
    max_per_class: Optional[int] = typer.Option(None, "--max-per-class", help="Keep at most this many images per class (random, seeded)."),
    max_classes: Optional[int] = typer.Option(None, "--max-classes", help="Keep at most this many classes (random among those big enough, seeded)."),
    seed: int = typer.Option(42, "--seed", help="Seed of numpy's PCG64 generator: same inputs + rule + seed = same result, on any platform."),
    overwrite: bool = flag("--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Combine manifests and apply a class-size rule; prints classes and images per domain before and after.

    A class is a (domain, label) pair. Classes below --min-per-class go first, then at most --max-classes are drawn, then each is capped at --max-per-class. Row order is kept.

    Example (the GLDv2 rule of M4D-35k):

        featcache manifest curate manifests/gldv2.csv --min-per-class 3 --max-per-class 10 --max-classes 10000 --out manifests/gldv2-10k.csv
    """
    from featcache.manifest.curate import Rule, read_inputs
    from featcache.manifest.curate import curate as curate_rows

    rule = Rule(min_per_class, max_per_class, max_classes)
    inputs, out_path = [place(i) for i in inputs], place(out_path)
    reads = _refuse_foreign_out(out_path, inputs)
    rows = read_inputs(inputs)
    kept = curate_rows(rows, rule, seed)
    kept.write(out_path, overwrite=overwrite, reads=reads)
    _counts_table(f"curated ({rule.describe()}, seed {seed}) -> {out_path}", rows, kept)


@manifest_app.command()
@friendly_errors
def recipe(
    recipe_file: Path = typer.Argument(..., help="Recipe TOML, e.g. manifests/m4d-35k.toml."),
    root: Path = typer.Option(..., "--root", help="Data root holding one folder per source (named in the recipe)."),
    out_path: str = typer.Option(..., "--out", help="Manifest CSV to write (a file or a URL); paths are relative to --root."),
    overwrite: bool = flag("--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Build a whole training set from a recipe: each source's builder, then its curation rule; combined, with the counts next to the published ones.

    Example (M4D-35k: DATA/products10k, DATA/gldv2, DATA/deepfashion, DATA/stanford-cars):

        featcache manifest recipe manifests/m4d-35k.toml --root DATA --out manifests/m4d-35k.csv
    """
    from featcache.manifest.recipe import load_recipe, run_recipe

    out_path = place(out_path)
    _refuse_foreign_out(out_path, [recipe_file])
    with recording_reads() as reads:
        r = load_recipe(recipe_file)
        rows, results = run_recipe(r, root, progress=lambda msg: err.print(f"[dim]{msg}[/]", highlight=False))
    for res in results:
        for n in res.notes:
            _note(f"{res.source.name}: {n}")
    rows.write(out_path, overwrite=overwrite, reads=reads)

    lines = []
    for res in results:
        p = res.source.published
        state = " (missing)" if res.missing else " (empty)" if res.empty else ""
        lines.append([res.source.name + state, sum(c.images for c in res.before.values()),
                      sum(c.classes for c in res.after.values()), p.classes,
                      sum(c.images for c in res.after.values()), p.images])
    lines.append(["total", sum(x[1] for x in lines), sum(x[2] for x in lines), r.published.classes,
                  sum(x[4] for x in lines), r.published.images])
    out.print(table(f"{r.name} (seed {r.seed}) -> {out_path}",
                    ["source", "built", "classes", "paper classes", "images", "paper images"], lines))
    missing = [res.source for res in results if res.missing]
    if missing:
        err.print(f"[yellow]{len(missing)} of {len(results)} sources are not under {root}[/]: "
                  + ", ".join(f"{s.name} ({s.folder}/)" for s in missing), highlight=False)
    empty = [res.source for res in results if res.empty]
    if empty:
        err.print(f"[yellow]{len(empty)} of {len(results)} sources kept no images and were left out[/]: "
                  + ", ".join(f"{s.name} (no class passes {s.rule.describe()})" for s in empty), highlight=False)
    _root_hint(out_path, root)


@manifest_app.command()
@friendly_errors
def check(
    manifest: str = typer.Argument(..., help="Manifest CSV to check (a file or a URL)."),
    root: Optional[str] = typer.Option(None, "--root", help="Folder (or URL) the manifest's paths are relative to (default: the manifest's folder)."),
    min_per_class: int = typer.Option(2, "--min-per-class", help="Warn about classes with fewer images (a class of 1 has no positive pair)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Threads opening images (default 2 x CPU cores, at most 32)."),
    decode: bool = typer.Option(True, "--decode/--no-decode", help="Decode every image (default), or only check the files exist and hash them."),
    json_out: bool = flag("--json", help="Print the full report as JSON on stdout (every problem listed)."),
) -> None:
    """Validate a manifest before a long extraction.

    Reports missing files, files that do not decode (opened with the reader extract uses, crop boxes included), rows naming the same file twice, byte-identical images under different labels, and classes below --min-per-class.

    Exit status 1 when extract would record failures (missing or undecodable images), 2 when the manifest itself is invalid, 0 otherwise.

    Example:

        featcache manifest check manifests/m4d-35k.csv --root DATA --min-per-class 3
    """
    from featcache.manifest import read_manifest
    from featcache.manifest.check import check_manifest, default_workers

    workers = default_workers(workers)  # a bad value is refused before the progress bar is drawn
    m = read_manifest(place(manifest), place(root))
    with progress_bar("img", disable=json_out) as bar:
        task = bar.add_task("checking images", total=len(m))
        report = check_manifest(m, min_per_class=min_per_class, workers=workers, decode=decode,
                                advance=lambda n: bar.advance(task, n))
    if json_out:
        print_json(report.to_json())
    else:
        _print_check(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_check(r) -> None:
    def status(n: int, fail: bool) -> str:
        return "ok" if not n else ("FAIL" if fail else "warn")

    n_ident = sum(len(g["rows"]) for g in r.identical_images)
    rows = [
        ["missing files", len(r.missing), status(len(r.missing), True)],
        ["undecodable images" if r.decoded else "unreadable files (not decoded)", len(r.undecodable), status(len(r.undecodable), True)],
        ["rows naming the same file", sum(len(g) for g in r.duplicate_paths), status(len(r.duplicate_paths), False)],
        ["identical images, different labels", n_ident, status(n_ident, False)],
        [f"classes under {r.min_per_class} images", len(r.small_classes), status(len(r.small_classes), False)],
        ["identical copies within a class", r.identical_same_class, "ok" if not r.identical_same_class else "info"],
    ]
    out.print(table(f"{r.manifest}: {r.rows:,} rows, {r.classes:,} classes, {len(r.domains)} domains (root {r.root})",
                    ["check", "rows", "status"], rows))

    def examples(title: str, items: list[str]) -> None:
        if not items:
            return
        out.print(f"[bold]{title}[/]", highlight=False)
        for s in items[:10]:
            out.print(f"  {s}", highlight=False, markup=False)
        if len(items) > 10:
            out.print(f"  ... and {len(items) - 10:,} more (--json lists all)", highlight=False)

    examples("missing", [x["path"] for x in r.missing])
    examples("undecodable", [f"{x['path']}: {x['reason']}" for x in r.undecodable])
    examples("same file", [" = ".join(g) for g in r.duplicate_paths])
    examples("identical images", [" = ".join(f"{x['path']} ({x['label']})" for x in g["rows"]) for g in r.identical_images])
    examples("small classes", [f"{c['label']} ({c['domain']}): {c['images']}" for c in r.small_classes])
    if r.ok:
        out.print("[green]ok[/]: every image opens; extract will record no failures.")
    else:
        out.print(f"[red]FAIL[/]: extract would record {len(r.missing) + len(r.undecodable):,} failure rows.")

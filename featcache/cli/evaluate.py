"""``featcache eval`` and ``runs``: stage three on the command line."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from featcache.cli.console import UserError, err, flag, friendly_errors, out, place, print_json, table
from featcache.evaluate.baselines import ZERO_SHOT
from featcache.evaluate.metrics import PROTOCOLS

app = typer.Typer()


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise UserError(f"--max-memory {text!r}: expected a size like 2GB, 512MB or a number of bytes")
    return int(float(m.group(1)) * 1024 ** "BKMGT".index(m.group(2) or "B"))


# the choices, as the modules that implement them name them
Protocol = Enum("Protocol", {name: name for name in PROTOCOLS}, type=str)
ZeroShot = Enum("ZeroShot", {name: name for name in ZERO_SHOT}, type=str)


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
    cache: Optional[str] = typer.Option(None, "--cache", "-c", help="Cache whose query/index rows (or all rows) are scored (a folder or a URL)."),
    run: Optional[str] = typer.Option(None, "--run", "-r", help="A train-head run directory (or URL): its head makes the embeddings."),
    zero_shot: Optional[ZeroShot] = typer.Option(None, help="No head: 'pooled' (feature averaged to 64 dims, the paper's baseline) or 'raw'. [default when no --run: pooled]"),
    protocol: Protocol = typer.Option(Protocol.guiec, help="guiec: same label is relevant, mean over queries. uned: same label and domain, mean over domains. ilias: same label, mAP@1000 with ILIAS's tie rule, mean over queries."),
    query_cache: Optional[str] = typer.Option(None, help="Queries from this cache (all valid rows) instead of --cache's query split."),
    index_cache: List[str] = typer.Option([], "--index-cache", metavar="CACHE", help="Index from this cache (all valid rows); repeatable: the labelled index is every cache given, searched one after the other."),
    domain: List[str] = typer.Option([], "--domain", help="Score only this domain's rows, queries and index (repeatable)."),
    k: Optional[int] = typer.Option(None, min=1, help="Neighbours scored per query (the @5). \\[default: 5; 1000 with --protocol ilias]"),
    label_sep: Optional[str] = typer.Option(None, help="Declare multi-label queries: a query label holding this text is relevant to each of its parts (UnED's GLDv2 queries: --label-sep '|'). \\[default: labels are compared whole]"),
    distractors: List[str] = typer.Option([], "--distractors", metavar="CACHE", help="A cache whose valid rows are searched after the index and are never relevant (ILIAS's YFCC images); repeatable. Big indexes are streamed from disk block by block."),
    qe: int = typer.Option(0, "--qe", min=0, help="Alpha query expansion: search again with each query plus its first N neighbours, weighted by similarity ** --alpha. \\[default: 0, off]"),
    dba: int = typer.Option(0, "--dba", min=0, help="Database-side augmentation: each index row plus its N nearest index rows, weighted alike (the index must fit in --max-memory). \\[default: 0, off]"),
    alpha: float = typer.Option(3.0, "--alpha", min=0, help="The weight exponent of --qe and --dba (ILIAS's own expansion uses 1)."),
    per_query: Optional[Path] = typer.Option(None, "--per-query", metavar="FILE", help="Write each query's path, label, domain, AP, precision@5 and the rank of its first relevant neighbour to this parquet file."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the scores to this JSON file (strict JSON: a score with nothing to average is null)."),
    plot: Optional[Path] = typer.Option(None, help="Write neighbours.png and domains.png into this folder."),
    overwrite: bool = flag(help="Replace the --json, --per-query and --plot files featcache wrote there before."),
    max_memory: str = typer.Option("2GB", help="Bound on the search's temporary memory."),
) -> None:
    """Score retrieval: mMP@k (GUIEC), mAP@k (UnED) and R@1, overall and per domain, by exact search.

    Without query/index splits every valid row is a query against all the others (itself excluded).
    A domain with query rows but no index rows is its own index: its queries search each other, each
    skipping itself (UnED's cars, SOP, iNat, Food2k, RP2K). A run's scores are also stored in its
    directory, the latest of each kind (caches, protocol, k, domains); `featcache runs` shows its full
    evaluation (every domain, k = 5) and says what was measured.
    """
    from featcache.evaluate.protocols import EvalSet, run_eval

    mem = parse_bytes(max_memory)
    k = k or (1000 if protocol.value == "ilias" else 5)
    cache, run, query_cache = place(cache), place(run), place(query_cache)
    index_cache = [place(c) for c in index_cache]
    if label_sep == "":
        raise UserError("--label-sep '': give the text that separates a query's labels, e.g. --label-sep '|'")
    if plot is not None and plot.exists() and not plot.is_dir():
        raise UserError(f"--plot {plot}: a file; give a folder for neighbours.png and domains.png")
    from featcache.evaluate.plots import PLOT_FILES, is_our_png
    from featcache.files import check_file_replaceable, is_featcache_json

    # refused before the work, not after it
    if json_file is not None:
        check_file_replaceable(json_file, is_featcache_json, "scores", overwrite, "--json")
    if per_query is not None:
        from featcache.evaluate.protocols import per_query_is_ours

        check_file_replaceable(per_query, per_query_is_ours, "per-query scores", overwrite, "--per-query")
    for name in PLOT_FILES if plot is not None else ():
        check_file_replaceable(plot / name, is_our_png, "a featcache picture", overwrite, "--plot")
    es = EvalSet.load(cache, query_cache, index_cache, domain, [place(d) for d in distractors], max_memory=mem)
    ev = run_eval(run=run, zero_shot=zero_shot.value if zero_shot else None, protocol=protocol.value, k=k,
                  max_memory=mem, show=8 if plot else 0, eval_set=es, label_sep=label_sep, qe=qe, dba=dba, alpha=alpha)
    results = {("run" if run else (zero_shot.value if zero_shot else "pooled")): ev.result}
    if plot and run is not None:
        results["zero-shot"] = run_eval(zero_shot="pooled", protocol=protocol.value, k=k, max_memory=mem, eval_set=es,
                                        label_sep=label_sep, qe=qe, dba=dba, alpha=alpha).result
    out.print(scores_table(f"featcache eval ({protocol.value}, {ev.result['embeddings']})", results, k))
    excluded = ev.result["overall"]["excluded"]
    if excluded:
        err.print(f"{excluded} queries have no relevant index row and are not scored.", highlight=False, markup=False)
        if label_sep is None and any("|" in str(x) for x in es.queries.labels):
            err.print("Some query labels hold '|' and are compared whole; if they list several labels (UnED's "
                      "GLDv2 queries do), pass --label-sep '|'.", highlight=False)
    if per_query:
        from featcache.evaluate.protocols import write_per_query

        write_per_query(per_query, ev, es, overwrite=overwrite)
        err.print(f"per-query scores: {per_query}", markup=False)
    if json_file:
        from featcache.files import write_user_json

        write_user_json(json_file, ev.result, what="scores", overwrite=overwrite)
    if plot:
        from featcache.evaluate.plots import write_plots

        files = write_plots(ev, results, plot, f"mMP@{k}", overwrite)
        err.print("plots: " + ", ".join(str(f) for f in files))


@app.command()
@friendly_errors
def runs(
    folder: str = typer.Argument("runs", help="Where to look for run directories (searched recursively): a folder or a URL."),
    json_out: bool = flag("--json", help="Print JSON instead of a table."),
) -> None:
    """List trained runs: loss, key options, epochs, training time and mMP@5, to compare at a glance.

    mMP@5 is the run's latest full evaluation (every domain, k = 5); "scored on" names its cache and
    protocol, or says that the run has only partial evaluations (one domain, another k).
    """
    from featcache.train.runs import list_runs

    folder = place(folder)
    rows = list_runs(folder)
    if json_out:
        print_json(rows)
        return
    if not rows:
        err.print(f"no runs under {folder}; train one with `featcache train-head`", markup=False)
        return
    out.print(table(f"runs under {folder}", ["run", "loss", "options", "epochs", "train s", "mMP@5", "scored on", "status"],
                    [[r["run"], r["loss"], r["options"], r["epochs"], r["train_seconds"], r["mMP@5"], r["scored_on"],
                      r["status"]] for r in rows], justify_numbers=False))

"""``featcache sweep``: many heads from one load of the features, scored as mean ± std over seeds.

Scoring is given from outside (``evaluate.protocols.RunScorer``): training knows nothing of evaluation."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from featcache.cache import FeatureCache, safe_name
from featcache.files import write_json, write_text
from featcache.storage import Remote, location
from featcache.train.loop import TrainOptions, check_options, load_train_data, train
from featcache.train.losses import LOSSES, canonical_name


def grid(losses: list[str], loss_opts: dict[str, list], varied: dict[str, list], fixed: dict[str, Any]) -> list[TrainOptions]:
    """Every combination; loss options a loss does not take are left out for it (no duplicates)."""
    combos: list[TrainOptions] = []
    seen = set()
    for name in losses:
        accepts = LOSSES[canonical_name(name)].defaults
        opt_lists = {k: v for k, v in loss_opts.items() if v and k in accepts}
        for opt_values in itertools.product(*opt_lists.values()):
            for values in itertools.product(*varied.values()):
                o = TrainOptions(loss=name, loss_opts=dict(zip(opt_lists, opt_values)), **dict(zip(varied, values)), **fixed)
                ident = json.dumps([o.loss, o.loss_opts, *values], sort_keys=True)
                if ident not in seen:
                    seen.add(ident)
                    combos.append(o)
    return combos


def label(o: TrainOptions, varied_keys: list[str]) -> str:
    parts = [f"{k}={v}" for k, v in sorted(o.loss_opts.items())]
    parts += [f"{k}={getattr(o, k)}" for k in varied_keys]
    return " ".join(parts) or "defaults"


def _mean_std(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.4f}" if len(a) == 1 else f"{a.mean():.4f} ± {a.std(ddof=1):.4f}"


class Scorer(Protocol):
    """Scores a finished run directory: what a sweep calls after every head it trains. ``metric`` names
    the score taken from ``result["overall"]``; ``source`` says what was scored (the eval cache);
    ``zero_shot(kind)`` scores a baseline without a head, for each kind in ``zero_shot_kinds``."""

    metric: str
    source: str
    zero_shot_kinds: tuple[str, ...]

    def __call__(self, run: Path) -> dict[str, Any]: ...

    def zero_shot(self, kind: str) -> dict[str, Any]: ...


def check_sweep_out(out: Path) -> None:
    """A sweep writes into a new or empty folder, nowhere else."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        kind = "a folder that is not empty" if out.is_dir() else "a file"
        raise ValueError(f"{out} is {kind}; a sweep writes into a new folder: choose another --out")


def same_images(caches: list[Path]) -> None:
    """Backbones are compared on one set of images: caches of different manifests are refused, naming both."""
    first = FeatureCache.open(caches[0])
    for c in caches[1:]:
        other = FeatureCache.open(c)
        if other.meta["manifest_sha256"] != first.meta["manifest_sha256"]:
            raise ValueError(f"--cache {first.path} ({first.rows:,} rows of {first.meta.get('manifest')}) and --cache "
                             f"{other.path} ({other.rows:,} rows of {other.meta.get('manifest')}) hold different images: "
                             "a sweep compares backbones on one manifest; extract both from the same one")


def run_sweep(caches: Path | Remote | list[Path | Remote], combos: list[TrainOptions], seeds: int, out: Path | Remote,
              scorers: Scorer | None | list[Scorer | None] = None,
              on_run: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train every combination ``seeds`` times on each cache (one load of its features each), scoring each
    run with that cache's scorer when it has one, beside its zero-shot baselines. ``sweep.json`` and
    ``sweep.md`` in ``out`` hold the finished rows, also after Ctrl-C."""
    caches = [location(c) for c in ([caches] if isinstance(caches, (str, Path, Remote)) else caches)]
    out = location(out)
    scorers = scorers if isinstance(scorers, list) else [scorers] * len(caches)
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: need at least 1")
    same_images(caches)
    device = combos[0].device if combos else "cpu"
    views = bool(combos and combos[0].views)
    datasets = [load_train_data(c, device, views=views) for c in caches]  # every cache checked before anything trains
    for data in datasets:
        for o in combos:
            check_options(o, data)
    check_sweep_out(out)
    out.mkdir(parents=True, exist_ok=True)
    varied_keys = [k for k in ("embed_dim", "dropout", "lr", "epochs", "batch_size") if len({getattr(o, k) for o in combos}) > 1]
    metric = next((s.metric for s in scorers if s is not None), None)
    results: list[dict[str, Any]] = []
    summary = {"cache": str(caches[0]), "caches": [str(c) for c in caches],
               "eval_cache": next((s.source for s in scorers if s is not None), None),
               "eval_caches": [s.source if s is not None else None for s in scorers],
               "seeds": seeds, "metric": metric, "complete": False, "results": results}
    names = [d.backbone for d in datasets]
    # the backbone column: its registry name, with the cache's own name where two caches share one
    labels = [n if names.count(n) == 1 else f"{n} ({c.stem})" for n, c in zip(names, caches)]
    folders = [f"{i:02d}-{safe_name(c.parent.name + '-' + c.stem)}" for i, c in enumerate(caches)]
    try:
        for data, score, backbone, folder in zip(datasets, scorers, labels, folders):
            where = out if len(caches) == 1 else out / folder
            if score is not None:
                for kind in score.zero_shot_kinds:
                    value = score.zero_shot(kind)["overall"][score.metric]
                    results.append({"backbone": backbone, "loss": f"zero-shot {kind}", "label": "-", "options": {},
                                    "final_loss": "-", "train_acc": "-", score.metric: f"{value:.4f}", "seconds": 0.0,
                                    "runs": []})
            _train_all(data, backbone, combos, seeds, where, score, varied_keys, results, on_run)
        summary["complete"] = True
    finally:  # also on Ctrl-C: the finished combinations are kept
        write_json(out / "sweep.json", summary)
        write_text(out / "sweep.md", markdown(summary))
    return summary


def _train_all(data, backbone, combos, seeds, out, score, varied_keys, results, on_run) -> None:
    for i, base in enumerate(combos):
        per_seed = []
        for s in range(seeds):
            o = replace(base, seed=42 + s)
            name = f"{i:03d}-{o.loss}-seed{o.seed}"
            if on_run:
                on_run(name)
            r = train(data, o, out / name)
            if not r.complete:  # train() keeps an interrupted head; a sweep stops there
                raise KeyboardInterrupt
            entry = {"run": str(out / name), "seed": o.seed, "final_loss": r.metrics[-1]["loss"],
                     "train_acc": r.metrics[-1]["train_acc"], "seconds": round(r.seconds, 3)}
            if score is not None:
                entry["eval"] = score(out / name)
                entry[score.metric] = entry["eval"]["overall"][score.metric]
            per_seed.append(entry)
        row = {
            "backbone": backbone,
            "loss": base.loss,
            "label": label(base, varied_keys),
            "options": {"loss_opts": base.loss_opts, **{k: getattr(base, k) for k in varied_keys}},
            "final_loss": _mean_std([e["final_loss"] for e in per_seed]),
            "train_acc": _mean_std([e["train_acc"] for e in per_seed]),
            "seconds": round(float(np.mean([e["seconds"] for e in per_seed])), 3),
            "runs": per_seed,
        }
        if score is not None:
            row[score.metric] = _mean_std([e[score.metric] for e in per_seed])
        results.append(row)


def markdown(summary: dict[str, Any]) -> str:
    """The results as a Markdown table, ready to paste (a backbone column, zero-shot rows first per backbone)."""
    metric = summary["metric"]
    head = ["backbone", "loss", "options", "final loss", "train acc", *([metric] if metric else []), "seconds"]
    caches = ", ".join(f"`{c}`" for c in summary.get("caches", [summary["cache"]]))
    lines = [f"# featcache sweep on {caches}", "",
             f"{summary['seeds']} seed(s) per row; values are mean ± std over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["results"]:
        cells = [r.get("backbone", "-"), r["loss"], r["label"], r["final_loss"], r["train_acc"],
                 *([r.get(metric, "-")] if metric else []), str(r["seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

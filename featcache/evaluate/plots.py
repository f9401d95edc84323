"""Pictures of an evaluation: neighbours framed by relevance, and per-domain scores against a baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from featcache.evaluate.protocols import EvalOutput
from featcache.files import write_output
from featcache.images import ImageFailure, load_image
from featcache.manifest import resolve
from featcache.storage import Remote, location

PNG_SOFTWARE = "featcache"  # the PNG text chunk that marks a picture featcache drew (and so may replace)
PLOT_FILES = ("neighbours.png", "domains.png")  # what write_plots draws into its folder
MAX_COLUMNS = 10  # neighbours drawn per query: a picture of --k 1000 would be 100,000 px wide
THUMB = 112
BORDER = 6
GREEN, RED, BLUE, GREY = (40, 170, 60), (210, 40, 40), (40, 90, 200), (200, 200, 200)


def _thumb(root: Path | Remote, path: str, colour: tuple[int, int, int]) -> Image.Image:
    try:
        im = ImageOps.pad(load_image(resolve(root, path)), (THUMB - 2 * BORDER, THUMB - 2 * BORDER), color=(255, 255, 255))
    except ImageFailure:
        im = Image.new("RGB", (THUMB - 2 * BORDER, THUMB - 2 * BORDER), GREY)
    return ImageOps.expand(im, border=BORDER, fill=colour)


def is_our_png(path: Path) -> bool:
    """A picture featcache drew: its PNG text says so, or (drawn before it did) it is one of the pictures an
    evaluation draws into a run's own ``plots`` folder."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return False
            if im.text.get("Software", "").startswith(PNG_SOFTWARE):
                return True
    except Exception:  # not a picture, or a damaged one: not ours
        return False
    run = path.parent.parent
    return (path.parent.name == "plots" and path.name in (*PLOT_FILES, "search.png")
            and (run / "config.json").is_file() and (run / "head.safetensors").is_file())


def save_png(dest: Path, save, overwrite: bool, option: str) -> Path:
    """``save(file)`` writes a PNG; it replaces ``dest`` only when featcache drew it and ``overwrite`` is given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return write_output(dest, save, ours=is_our_png, what="a featcache picture", overwrite=overwrite, option=option)


def _save_sheet(sheet: Image.Image, dest: Path, overwrite: bool, option: str) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    return save_png(dest, lambda tmp: sheet.save(tmp, format="PNG", pnginfo=info), overwrite, option)


def _save_figure(fig, dest: Path, overwrite: bool, option: str) -> Path:
    return save_png(dest, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": PNG_SOFTWARE}), overwrite, option)


def neighbours_grid(ev: EvalOutput, dest: Path, overwrite: bool = False, option: str = "--plot") -> Path:
    """One row per shown query: the query (blue frame), then its top neighbours (at most ``MAX_COLUMNS``),
    green if relevant, red if not."""
    q_root, q_paths = location(ev.queries.cache.meta["root"]), ev.queries.cache.strings("paths")
    tiles: dict[int, tuple] = {}  # index position -> (root, path), looked up once for every shown neighbour
    shown = np.unique(ev.neighbours)
    for cache, rows, where in ev.index.located(shown):
        root = location(cache.meta["root"])
        tiles.update(zip(shown[where].tolist(), ((root, p) for p in cache.strings("paths", rows))))
    rows, k = ev.neighbours.shape
    k = min(k, MAX_COLUMNS)
    gap, label_h = 12, 18
    sheet = Image.new("RGB", ((k + 1) * THUMB + gap, rows * (THUMB + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        y = r * (THUMB + label_h)
        sheet.paste(_thumb(q_root, q_paths[ev.queries.rows[r]], BLUE), (0, y))
        draw.text((2, y + THUMB + 2), f"query: {ev.queries.labels[r]}"[:18], fill="black")
        for j in range(k):
            pos = ev.neighbours[r, j]
            x = gap + (j + 1) * THUMB
            if pos >= len(ev.index):  # a distractor (eval --distractors): never relevant, drawn as a red tile
                sheet.paste(ImageOps.expand(Image.new("RGB", (THUMB - 2 * BORDER,) * 2, GREY), border=BORDER, fill=RED), (x, y))
                draw.text((x + 2, y + THUMB + 2), "distractor", fill="black")
                continue
            sheet.paste(_thumb(*tiles[int(pos)], GREEN if ev.relevant[r, j] else RED), (x, y))
            draw.text((x + 2, y + THUMB + 2), str(ev.index.labels[pos])[:18], fill="black")
    return _save_sheet(sheet, dest, overwrite, option)


def search_grid(results: list[dict], dest: Path, overwrite: bool = False, option: str = "--plot") -> Path:
    """One row per query of ``featcache search``: the query (blue frame), then its neighbours (at most
    ``MAX_COLUMNS``), each with its label and cosine score."""
    rows = len(results)
    k = min(MAX_COLUMNS, max((len(r["neighbours"]) for r in results), default=0))
    gap, label_h = 12, 30
    sheet = Image.new("RGB", ((k + 1) * THUMB + gap, max(1, rows) * (THUMB + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    here = Path(".")
    for r, result in enumerate(results):
        y = r * (THUMB + label_h)
        sheet.paste(_thumb(here, result["query"], BLUE), (0, y))
        draw.text((2, y + THUMB + 2), Path(result["query"]).name[:18], fill="black")
        for j, n in enumerate(result["neighbours"][:k]):
            x = gap + (j + 1) * THUMB
            sheet.paste(_thumb(here, n["path"], GREY), (x, y))
            draw.text((x + 2, y + THUMB + 2), str(n["label"])[:18], fill="black")
            draw.text((x + 2, y + THUMB + 15), f"{n['score']:.3f}", fill="black")
    return _save_sheet(sheet, dest, overwrite, option)


def domain_scores(results: dict[str, dict], dest: Path, metric: str = "mMP@5", overwrite: bool = False,
                  option: str = "--plot") -> Path:
    """Grouped bars: ``metric`` per domain (and overall) for each named result, e.g. run vs zero-shot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    domains = sorted({d for r in results.values() for d in r["domains"]})
    groups = ["overall", *domains] if len(domains) > 1 else domains
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) * len(names) + 1.5), 3.6), dpi=120)
    for i, name in enumerate(names):
        r = results[name]
        values = [r["overall"][metric] if g == "overall" else r["domains"].get(g, {}).get(metric, np.nan) for g in groups]
        x = np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width
        bars = ax.bar(x, values, width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per domain ({results[names[0]]['protocol']} protocol)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(names), fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _save_figure(fig, dest, overwrite, option)
    finally:
        plt.close(fig)


def sweep_chart(summary: dict, dest: Path) -> Path:
    """The sweep's metric per combination (mean, with ± std over seeds as error bars), grouped by backbone;
    zero-shot rows are the grey bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["metric"]
    rows = [r for r in summary["results"] if r.get(metric) not in (None, "-")]
    means, errs, names, colours = [], [], [], []
    for r in rows:
        values = [run[metric] for run in r["runs"]] or [float(r[metric])]
        means.append(float(np.mean(values)))
        errs.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
        names.append(f"{r.get('backbone', '')}\n{r['loss']}" + (f"\n{r['label']}" if r["label"] not in ("-", "defaults") else ""))
        colours.append("#999999" if r["loss"].startswith("zero-shot") else "#1f77b4")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 4.2), dpi=120)
    x = np.arange(len(rows))
    ax.bar(x, means, 0.7, yerr=errs, capsize=3, color=colours)
    for xi, m in zip(x, means):
        ax.text(xi, m + 0.01, f"{m:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, fontsize=7, rotation=0)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}, mean ± std over {summary['seeds']} seed(s)")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    try:
        return _save_figure(fig, dest, False, "--out")  # the sweep's own new folder
    finally:
        plt.close(fig)


def write_plots(ev: EvalOutput, results: dict[str, dict], folder: Path, metric: str = "mMP@5",
                overwrite: bool = False) -> list[Path]:
    """``neighbours.png`` (``ev``'s shown queries) and ``domains.png`` (``results`` side by side) in ``folder``;
    each replaces only a picture featcache drew, and only with ``overwrite``."""
    neighbours, domains = (folder / name for name in PLOT_FILES)
    return [neighbours_grid(ev, neighbours, overwrite), domain_scores(results, domains, metric, overwrite)]

"""Run directories: what ``train-head`` leaves behind, and loading a trained head back with one call.
This is the one module that reads and writes a run directory's files: the rest of featcache goes through it.

``runs/NAME/``
- ``config.json``: every resolved option, the cache key and path, the package version, ``complete``.
- ``metrics.jsonl``: one JSON line per finished epoch.
- ``head.safetensors``: the projection head (all you need to embed).
- ``class_weights.safetensors``: the loss's class weights and buffers (training only).
- ``state.pt``: optimiser and RNG state of the last finished epoch, for ``--resume``; removed when done.
- ``eval.json``: this run's ``featcache eval`` results, the latest of each kind (which caches, protocol,
  k, domains): ``featcache runs`` shows the latest full one (every domain, k = 5) and says what it measured.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors, save_file

from featcache import __version__
from featcache.cache import head_space
from featcache.files import exclusive, write_file, write_json, write_text
from featcache.storage import Remote, location
from featcache.train.heads import ProjectionHead

CONFIG, METRICS, HEAD, CLASS_WEIGHTS, STATE, EVAL = (
    "config.json", "metrics.jsonl", "head.safetensors", "class_weights.safetensors", "state.pt", "eval.json",
)
RUN_FILES = (CONFIG, METRICS, HEAD, CLASS_WEIGHTS, STATE, EVAL)  # what train-head writes into a run directory
WRITE_ORDER = (HEAD, CLASS_WEIGHTS, METRICS, STATE, CONFIG)  # an epoch's files as written: config.json commits it


class RunError(ValueError):
    """A run directory that cannot be used; the message names it."""


class ForeignConfig(RunError):
    """A config.json that is readable but not a featcache run's."""


def read_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The config.json of the run directory ``path``, or None where it holds none; a damaged or foreign
    one is a one-line RunError naming the file (ForeignConfig for a foreign one)."""
    file = location(path) / CONFIG
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        raise RunError(f"{file}: not readable as a featcache run's config ({e})") from None
    if not isinstance(config, dict) or "featcache_version" not in config:
        raise ForeignConfig(f"{file}: not a featcache run's config")
    return config


def write_config(path: Path, config: dict[str, Any]) -> None:
    write_json(path / CONFIG, config)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, one dict per finished epoch; an OSError where the file is missing."""
    return [json.loads(line) for line in (path / METRICS).read_text().splitlines() if line.strip()]


def write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    write_text(path / METRICS, "".join(json.dumps(m) + "\n" for m in metrics))


def start_run(path: Path, config: dict[str, Any]) -> None:
    """A new run directory (or one emptied of its run): its config.json and an empty metrics.jsonl."""
    path.mkdir(parents=True, exist_ok=True)
    write_config(path, config)
    write_metrics(path, [])


def remove_run_files(path: Path) -> None:
    """The run's own files (RUN_FILES); anything else a user put in its directory stays."""
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    write_file(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                                           metadata=metadata))


def save_weights(path: Path, head: ProjectionHead, loss: torch.nn.Module) -> None:
    """head.safetensors (with the head's config, all it takes to load it) and class_weights.safetensors."""
    save_tensors(path / HEAD, head.state_dict(), {"featcache": json.dumps(head.config())})
    save_tensors(path / CLASS_WEIGHTS, loss.state_dict())


def save_state(path: Path, state: dict[str, Any]) -> None:
    """state.pt, for ``--resume``: tensors, numbers and strings only (what ``load_state`` accepts)."""
    write_file(path / STATE, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any] | None:
    """state.pt read as data (tensors, numbers, strings): a file that needs anything else is refused; None
    where there is none."""
    file = path / STATE
    if not file.is_file():
        return None
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refusals come as UnpicklingError, truncation as several types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RunError(f"{file}: not a featcache training state (refused to load it: {reason})") from None


def remove_state(path: Path) -> None:
    (path / STATE).unlink(missing_ok=True)


@torch.inference_mode()
def apply_head(head: ProjectionHead, features: np.ndarray | torch.Tensor, owner: str, batch_size: int = 65536) -> np.ndarray:
    """``head`` on raw backbone features (N, in_dim), a batch at a time: float32 (N, embed_dim). ``owner``
    (the run or index the head is from) names it in the error for features of another width."""
    x = torch.as_tensor(np.asarray(features)) if not isinstance(features, torch.Tensor) else features
    if x.ndim != 2 or x.shape[1] != head.in_dim:
        raise RunError(f"{owner}: the head takes {head.in_dim}-d features, got shape {tuple(x.shape)}")
    return torch.cat([head(x[i:i + batch_size].float()) for i in range(0, len(x), batch_size)]).numpy()


def load_head(weights: bytes, config: dict[str, Any]) -> ProjectionHead:
    """A head from the bytes of its safetensors file and its ``config()`` (tensors only: nothing runs)."""
    head = ProjectionHead(config["in_dim"], config["embed_dim"], config["dropout"], tuple(config.get("hidden", ())))
    head.load_state_dict(load_tensors(weights))
    return head.eval()


def damage(e: BaseException) -> str:
    """What went wrong reading a damaged file, in a few words: the error's type and first line."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}".rstrip(": ")


@dataclass
class Run:
    """A trained head. ``Run.load(path).embed(features)`` gives L2-normalisable E-dim embeddings."""

    path: Path | Remote
    config: dict[str, Any]
    head: ProjectionHead
    head_bytes: bytes = field(default=b"", repr=False)  # head.safetensors as loaded: what was hashed is what runs

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        path = location(path)
        if not (path / CONFIG).is_file() or not (path / HEAD).is_file():
            raise RunError(f"{path}: not a featcache run (needs {CONFIG} and {HEAD}; train one with `featcache train-head`)")
        config = read_config(path)
        try:
            weights = (path / HEAD).read_bytes()  # read once: a run being trained may replace the file meanwhile
            head = load_head(weights, config["head"])
        except Exception as e:  # safetensors and torch each raise their own types for a damaged file
            raise RunError(f"{path}: a damaged run ({damage(e)})") from None
        return cls(path, config, head, weights)

    @property
    def cache_key(self) -> str:
        return self.config["cache"]["key"]

    @functools.cached_property
    def head_sha256(self) -> str:
        """The identity of this head: the sha256 of its weights file as loaded (a retrained head is another)."""
        return hashlib.sha256(self.head_bytes).hexdigest()

    @property
    def features_space(self) -> dict[str, Any]:
        """The feature space the head was trained on (``cache.feature_space``)."""
        return self.config["cache"].get("feature_space") or {}

    def embedding_space(self) -> dict[str, Any]:
        """The space of this head's embeddings (``cache.head_space``)."""
        return head_space(self.features_space, self.head_sha256)

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path) if (self.path / METRICS).exists() else []

    def evaluations(self) -> list[dict[str, Any]]:
        """Every kind of evaluation recorded for this run, oldest first: ``{"measured": {...}, "result": {...}}``
        (an eval.json from before the record held one bare result, measured on every domain)."""
        f = self.path / EVAL
        if not f.exists():
            return []
        try:
            record = json.loads(f.read_text())
            if isinstance(record, dict) and "evaluations" in record:
                evaluations = list(record["evaluations"])
                if not all(isinstance(e, dict) and isinstance(e.get("measured"), dict) and isinstance(e.get("result"), dict)
                           for e in evaluations):
                    raise ValueError("an evaluation without its record")
                return evaluations
            measured = {"cache": record["cache"], "protocol": record["protocol"], "k": record["k"], "domains": None}
            return [{"measured": measured, "result": record}]
        except Exception as e:  # JSON and shape errors of a damaged file
            raise RunError(f"{self.path}: {EVAL} is damaged ({damage(e)})") from None

    def record_eval(self, measured: dict[str, Any], result: dict[str, Any]) -> None:
        """Keep ``result`` as the latest evaluation of its kind (``measured``, plus the head's sha256: a result
        of an earlier head is never shown as this one's), beside the other kinds. Evaluations of one run
        running at once take turns (a lock), so none is lost; a damaged eval.json is replaced."""
        measured = {**measured, "head_sha256": self.head_sha256}
        with exclusive(self.path / EVAL, "this run's evaluations", remove=True, wait=True):
            try:
                kept = [e for e in self.evaluations() if e["measured"] != measured]
            except RunError:
                kept = []
            write_json(self.path / EVAL, {"featcache_version": __version__,
                                          "evaluations": [*kept, {"measured": measured, "result": result}]})

    def summary_eval(self) -> dict[str, Any] | None:
        """The evaluation ``runs`` shows: the latest full one (every domain, k = 5) of the head the run has
        now, else its latest."""
        current = self.head_sha256
        evaluations = [e for e in self.evaluations() if e["measured"].get("head_sha256", current) == current]
        full = [e for e in evaluations if is_full(e["measured"])]
        return (full or evaluations or [None])[-1]

    def embed(self, features: np.ndarray | torch.Tensor, batch_size: int = 65536) -> np.ndarray:
        """Apply the head to raw backbone features (N, in_dim); returns float32 (N, embed_dim)."""
        return apply_head(self.head, features, str(self.path), batch_size)


def is_full(measured: dict[str, Any]) -> bool:
    """The evaluation ``runs`` shows as a run's score: every domain, k = 5, plain search (no expansion)."""
    cache = measured.get("cache")
    with_distractors = isinstance(cache, dict) and "distractors" in cache
    return not measured.get("domains") and measured.get("k") == 5 and not measured.get("expansion") and not with_distractors


def describe_measured(measured: dict[str, Any]) -> str:
    """What an evaluation measured, in a few words: ``c.zarr (guiec)``, ``c.zarr (uned, k=10, domain cars)``."""
    cache = measured.get("cache")
    distractors = cache.get("distractors") if isinstance(cache, dict) else None
    if distractors is not None:
        cache = cache.get("index")
    if isinstance(cache, dict):
        index = cache.get("index")
        named = "+".join(Path(str(c)).name for c in index) if isinstance(index, list) else Path(str(index)).name
        cache = f"{Path(str(cache.get('query'))).name} -> {named}"
    parts = [str(measured.get("protocol"))]
    if distractors:
        parts.append("distractors " + ", ".join(Path(str(d)).name for d in distractors))
    if measured.get("k") != 5:
        parts.append(f"k={measured.get('k')}")
    if measured.get("domains"):
        parts.append("domain " + ", ".join(map(str, measured["domains"])))
    if measured.get("groups"):
        parts.append(str(measured["groups"]))
    if measured.get("expansion"):
        parts.append(", ".join(f"{key}={value}" for key, value in measured["expansion"].items()))
    return f"{cache if ' -> ' in str(cache) else Path(str(cache)).name} ({', '.join(parts)})"


def list_runs(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run below ``folder``, oldest first, with what a comparison table needs. A run whose files are
    damaged is listed with status "damaged: why"; a config.json that is not a run's is passed over."""
    rows = []
    for cfg in _configs_below(location(folder)):
        try:
            config = read_config(cfg.parent) or {}  # None: a config.json that is not a file, listed as unreadable
        except ForeignConfig:
            continue
        except RunError:
            config = {}  # unreadable: if it is a run's, the row below says so
        row = {"run": str(cfg.parent), "loss": None, "options": None, "epochs": None, "train_seconds": None,
               "mMP@5": None, "scored_on": None, "status": "incomplete"}
        if not (cfg.parent / HEAD).is_file() and not config.get("epochs_done"):
            rows.append(row)  # stopped before its first epoch finished
            continue
        try:
            row.update(_summary(Run.load(cfg.parent)))
        except (RunError, KeyError, TypeError, ValueError, AttributeError) as e:
            reason = str(e).split(": ", 1)[-1] if isinstance(e, RunError) else f"{type(e).__name__}: {e}"
            row["status"] = f"damaged: {reason}"
        rows.append(row)
    return rows


def _configs_below(folder: Path | Remote) -> list[Path | Remote]:
    """Every config.json below ``folder``, oldest first (by modification time; by name on an object store)."""
    if isinstance(folder, Remote):
        return [folder / rel for rel in sorted(folder.files()) if rel.rsplit("/", 1)[-1] == CONFIG]
    return sorted(folder.rglob(CONFIG), key=lambda p: p.stat().st_mtime)


def _summary(run: Run) -> dict[str, Any]:
    o = run.config["options"]
    lo = o.get("loss_opts", {})
    keys = [("sub_centers", "k"), ("margin", "m"), ("scale", "s")]
    options = " ".join(f"{short}={lo[k]:g}" if isinstance(lo.get(k), (int, float)) else "" for k, short in keys if k in lo).strip()
    options = f"{options} E={o['embed_dim']} bs={o['batch_size']} lr={o['lr']:g}".strip()
    ev = run.summary_eval()
    return {
        "loss": o["loss"],
        "options": options,
        "epochs": f"{run.config['epochs_done']}/{o['epochs']}",
        "train_seconds": run.config.get("train_seconds"),
        # mMP@5 only where the evaluation shown scored every domain at k = 5; "scored_on" says what it was
        "mMP@5": ev["result"]["overall"].get("mMP@5") if ev and is_full(ev["measured"]) else None,
        "scored_on": describe_measured(ev["measured"]) + ("" if is_full(ev["measured"]) else ": no full evaluation")
                     if ev else None,
        "status": "complete" if run.config.get("complete") else "incomplete",
    }

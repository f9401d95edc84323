"""Run directories: what ``train-head`` leaves behind, and loading a trained head back with one call.

``runs/NAME/``
- ``config.json``: every resolved option, the cache key and path, the package version, ``complete``.
- ``metrics.jsonl``: one JSON line per finished epoch.
- ``head.safetensors``: the projection head (all you need to embed).
- ``class_weights.safetensors``: the loss's class weights and buffers (training only).
- ``state.pt``: optimiser and RNG state of the last finished epoch, for ``--resume``; removed when done.
- ``eval.json``: the latest ``featcache eval`` result for this run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from featcache.files import write_file
from featcache.train.heads import ProjectionHead

CONFIG, METRICS, HEAD, CLASS_WEIGHTS, STATE, EVAL = (
    "config.json", "metrics.jsonl", "head.safetensors", "class_weights.safetensors", "state.pt", "eval.json",
)


class RunError(ValueError):
    """A run directory that cannot be used; the message names it."""


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    write_file(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                                           metadata=metadata))


@dataclass
class Run:
    """A trained head. ``Run.load(path).embed(features)`` gives L2-normalisable E-dim embeddings."""

    path: Path
    config: dict[str, Any]
    head: ProjectionHead

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / HEAD).is_file():
            raise RunError(f"{path}: not a featcache run (needs {CONFIG} and {HEAD}; train one with `featcache train-head`)")
        try:
            config = json.loads((path / CONFIG).read_text())
            h = config["head"]
            head = ProjectionHead(h["in_dim"], h["embed_dim"], h["dropout"], tuple(h.get("hidden", ())))
            head.load_state_dict(load_file(str(path / HEAD)))
        except Exception as e:  # JSON, safetensors and torch each raise their own types for a damaged file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise RunError(f"{path}: a damaged run ({type(e).__name__}: {reason})") from None
        return cls(path, config, head.eval())

    @property
    def cache_key(self) -> str:
        return self.config["cache"]["key"]

    def metrics(self) -> list[dict[str, Any]]:
        f = self.path / METRICS
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []

    def eval_result(self) -> dict[str, Any] | None:
        f = self.path / EVAL
        return json.loads(f.read_text()) if f.exists() else None

    @torch.inference_mode()
    def embed(self, features: np.ndarray | torch.Tensor, batch_size: int = 65536) -> np.ndarray:
        """Apply the head to raw backbone features (N, in_dim); returns float32 (N, embed_dim)."""
        x = torch.as_tensor(np.asarray(features)) if not isinstance(features, torch.Tensor) else features
        if x.ndim != 2 or x.shape[1] != self.head.in_dim:
            raise RunError(f"{self.path}: the head takes {self.head.in_dim}-d features, got shape {tuple(x.shape)}")
        return torch.cat([self.head(x[i:i + batch_size].float()) for i in range(0, len(x), batch_size)]).numpy()


def list_runs(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run below ``folder``, oldest first, with what a comparison table needs. A run whose files are
    damaged is listed with status "damaged: why"; a config.json that is not a run's is passed over."""
    rows = []
    for cfg in sorted(Path(folder).rglob(CONFIG), key=lambda p: p.stat().st_mtime):
        try:
            config = json.loads(cfg.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            config = {"featcache_version": "?"}  # unreadable: if it is a run's, the row below says so
        if not isinstance(config, dict) or "featcache_version" not in config:
            continue
        row = {"run": str(cfg.parent), "loss": None, "options": None, "epochs": None, "train_seconds": None,
               "mMP@5": None, "status": "incomplete"}
        if not (cfg.parent / HEAD).is_file() and not config.get("epochs_done"):
            rows.append(row)  # stopped before its first epoch finished
            continue
        try:
            row.update(_summary(Run.load(cfg.parent)))
        except (RunError, KeyError, TypeError, ValueError) as e:
            reason = str(e).split(": ", 1)[-1] if isinstance(e, RunError) else f"{type(e).__name__}: {e}"
            row["status"] = f"damaged: {reason}"
        rows.append(row)
    return rows


def _summary(run: Run) -> dict[str, Any]:
    o = run.config["options"]
    lo = o.get("loss_opts", {})
    keys = [("sub_centers", "k"), ("margin", "m"), ("scale", "s")]
    options = " ".join(f"{short}={lo[k]:g}" if isinstance(lo.get(k), (int, float)) else "" for k, short in keys if k in lo).strip()
    options = f"{options} E={o['embed_dim']} bs={o['batch_size']} lr={o['lr']:g}".strip()
    ev = run.eval_result()
    return {
        "loss": o["loss"],
        "options": options,
        "epochs": f"{run.config['epochs_done']}/{o['epochs']}",
        "train_seconds": run.config.get("train_seconds"),
        "mMP@5": ev["overall"].get("mMP@5") if ev else None,
        "status": "complete" if run.config.get("complete") else "incomplete",
    }

"""The trained embedder, rebuilt from what the cache and the run recorded: image -> backbone -> head -> L2.

Export, index and search all start here. The backbone is rebuilt from the cache's own record (registry
name, library, architecture, pretrained tag, preprocessing) and its weights are checked against the
one the cache recorded: a local file by its sha256, a hub download by its id, random init by its seed.
Nothing is rebuilt silently from anything else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from featcache.cache import CacheError, FeatureCache, feature_space, file_sha256
from featcache.evaluate.protocols import check_run_fits
from featcache.extract.backbones import Backbone, create_backbone
from featcache.train.heads import ProjectionHead
from featcache.storage import location
from featcache.train.runs import Run, RunError


class DeployError(ValueError):
    """A run, cache or weights file that cannot be deployed as asked; the message names it."""


def open_run(path: str | os.PathLike) -> tuple[Run, FeatureCache]:
    """A finished run and the cache it was trained on (which must still be there, unchanged)."""
    run = Run.load(path)
    if not run.config.get("complete"):
        raise DeployError(f"{run.path}: the run is incomplete ({run.config.get('epochs_done', 0)} of "
                          f"{run.config['options']['epochs']} epochs); finish it with `featcache train-head --resume`")
    cache_path = location(run.config["cache"]["path"])
    try:
        cache = FeatureCache.open(cache_path)
    except CacheError:
        raise DeployError(f"{run.path}: its cache {cache_path} is gone (the export rebuilds the backbone from the "
                          "cache's record); extract it again to that path") from None
    if cache.key != run.cache_key:
        raise DeployError(f"{run.path}: {cache_path} is no longer the cache it was trained on (key {cache.key}, "
                          f"run {run.cache_key})")
    return run, cache


def collection(cache_path: str | os.PathLike, run: str | os.PathLike | None = None) -> tuple[FeatureCache, np.ndarray, Run | None]:
    """A complete cache, its valid rows, and the run whose head embeds them (checked to fit its features)."""
    cache = FeatureCache.open(cache_path)
    cache.require_complete()
    head_run = Run.load(run) if run is not None else None
    if head_run is not None:
        check_run_fits(head_run, cache)
    rows = np.flatnonzero(cache.valid())
    if not len(rows):
        raise DeployError(f"{cache.path}: no valid rows")
    return cache, rows, head_run


def check_weights(recorded: str, weights: Path | None) -> None:
    """Refuse a ``--weights`` file that is not the one the cache recorded, or a missing one that is needed."""
    if recorded.startswith("sha256:"):
        if weights is None:
            raise DeployError(f"the cache's features came from a local weights file ({recorded}); pass it with --weights FILE")
        have = f"sha256:{file_sha256(weights)}"
        if have != recorded:
            raise DeployError(f"--weights {weights}: {have} is not the file the cache recorded ({recorded})")
    elif recorded.startswith("random-init") and weights is not None:
        raise DeployError(f"--weights {weights}: the cache's features came from random weights ({recorded}); leave --weights out")


def rebuild_backbone(meta: dict[str, Any], weights: str | os.PathLike | None = None, device: str = "cpu") -> Backbone:
    """The backbone exactly as a cache recorded it, or a one-line DeployError saying what differs."""
    recorded = meta["backbone"]
    if recorded["library"] == "import":
        raise DeployError(f"these features were imported from {recorded['arch']}, not extracted by featcache: it cannot "
                          "rebuild the model that made them to embed images (search with --query-cache, or extract "
                          "the images with `featcache extract`)")
    weights = Path(weights) if weights is not None else None
    if weights is not None and not weights.is_file():
        raise DeployError(f"--weights {weights}: file not found")
    check_weights(recorded["weights"], weights)
    backbone = create_backbone(recorded["name"], weights, device)
    built = backbone.describe()
    for key in ("library", "arch", "pretrained", "dim"):
        if built[key] != recorded[key]:
            raise DeployError(f"{recorded['name']} now builds {key} {built[key]!r}, but the cache recorded {recorded[key]!r}")
    if not recorded["weights"].startswith("hub:") and built["weights"] != recorded["weights"]:
        raise DeployError(f"{recorded['name']} now loads weights {built['weights']}, the cache recorded {recorded['weights']}")
    if backbone.preprocessing != meta["preprocessing"]:
        raise DeployError(f"{recorded['name']}'s preprocessing is now {backbone.preprocessing}, the cache recorded "
                          f"{meta['preprocessing']}")
    return backbone


class Encoder(nn.Module):
    """Preprocessed images (B, 3, S, S) -> the head's raw embedding (B, E): backbone, then head."""

    def __init__(self, backbone: Backbone, head: ProjectionHead):
        super().__init__()
        self.backbone = backbone
        self.head = head.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


@dataclass
class Embedder:
    """What a query needs to be embedded like a run's collection: the rebuilt backbone and the run's head
    (or no head: the raw features, for indexes of a cache without a run)."""

    backbone: Backbone
    head: ProjectionHead | None
    run: Run | None
    cache_meta: dict[str, Any]
    device: str = "cpu"

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, weights=None, device: str = "cpu") -> "Embedder":
        run, cache = open_run(run_dir)
        backbone = rebuild_backbone(cache.meta, weights, device)
        return cls(backbone, run.head.to(device).eval(), run, cache.meta, device)

    @property
    def dim(self) -> int:
        return self.head.embed_dim if self.head is not None else self.backbone.dim

    def space(self) -> dict[str, Any]:
        """The feature space of what ``embed_images`` returns (``cache.feature_space``/``head_space``)."""
        return self.run.embedding_space() if self.run is not None else feature_space(self.cache_meta)

    def encoder(self) -> nn.Module:
        return Encoder(self.backbone, self.head) if self.head is not None else self.backbone

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """An RGB image preprocessed as at extraction: what ``embed_prepared`` takes."""
        return self.backbone.transform(image)

    @torch.inference_mode()
    def embed_prepared(self, tensors: list[torch.Tensor]) -> np.ndarray:
        """(B, E) float32 L2-normalised embeddings of images ``prepare`` made."""
        x = torch.stack(list(tensors)).to(self.device)
        return F.normalize(self.encoder()(x).float(), dim=1).cpu().numpy()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """(B, E) float32 L2-normalised embeddings of RGB images, preprocessed as at extraction."""
        return self.embed_prepared([self.prepare(im) for im in images])


__all__ = ["DeployError", "Embedder", "Encoder", "RunError", "check_weights", "collection", "open_run", "rebuild_backbone"]

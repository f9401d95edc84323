"""One factory for every backbone: a name (registry entry, ``open_clip:ARCH[@TAG]`` or ``timm:NAME``)
to a frozen image encoder with its eval transform; and the registry described for ``featcache models``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from featcache.extract.backbones import open_clip_models, timm_models
from featcache.extract.backbones.base import Backbone, quiet_library_logs
from featcache.extract.backbones.registry import REGISTRY, BackboneError, BackboneSpec, resolve_spec

FAMILIES = {"open_clip": open_clip_models, "timm": timm_models}  # library -> module with build() and meta_facts()


def create_backbone(name: str, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Backbone:
    """Build the named backbone on ``device``, from ``weights`` (a local file) when given."""
    spec = resolve_spec(name)
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise BackboneError(f"weights file not found: {weights}")
    return FAMILIES[spec.library].build(spec, weights, torch.device(device))


def describe_registry() -> list[dict[str, Any]]:
    """One row per registry entry with output dim, image size and vision parameter count, computed
    from the architecture on the meta device (no weights are loaded or downloaded)."""
    rows = []
    for spec in REGISTRY.values():
        with quiet_library_logs():
            dim, size, params = _meta_facts(spec)
        rows.append({
            "name": spec.name,
            "source": spec.label,
            "dim": dim,
            "image_size": size,
            "params_m": round(params / 1e6, 1) if params else None,
            "summary": spec.summary,
        })
    return rows


def _meta_facts(spec: BackboneSpec) -> tuple[int | None, int | None, int | None]:
    try:
        with torch.device("meta"):
            dim, size, visual = FAMILIES[spec.library].meta_facts(spec)
        return dim, int(size[0]), sum(p.numel() for p in visual.parameters())
    except Exception:  # listing must not fail because one architecture cannot be built here
        return None, None, None

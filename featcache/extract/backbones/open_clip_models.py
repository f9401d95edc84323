"""open_clip backbones: CLIP, SigLIP, EVA-CLIP, MetaCLIP and any other ``open_clip:ARCH[@TAG]``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from featcache.cache import file_sha256
from featcache.extract.backbones.base import (
    RANDOM_INIT_SEED,
    Backbone,
    missing_weights,
    quiet_library_logs,
)
from featcache.extract.backbones.registry import BackboneError, BackboneSpec

_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_local_configs() -> None:
    import open_clip

    if "featcache-tiny-vit" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def resolve_preprocess(spec: BackboneSpec) -> dict[str, Any]:
    """open_clip preprocessing overrides: the pretrained tag's own, then the registry entry's.

    Passed explicitly so that a local weights file gets the same transform as the hub download
    (open_clip falls back to OpenAI's mean/std when ``pretrained`` is a file path).
    """
    import open_clip

    pp: dict[str, Any] = {}
    if spec.pretrained:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        if spec.pretrained not in tags:
            raise BackboneError(
                f"open_clip model {spec.arch} has no pretrained tag '{spec.pretrained}' (tags: {', '.join(tags) or 'none'})"
            )
        pcfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
        pp = {k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg}
    pp.update(spec.preprocess)
    return pp


def hub_id(spec: BackboneSpec) -> str | None:
    import open_clip

    if not spec.pretrained:
        return None
    pcfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    return pcfg.get("hf_hub") or pcfg.get("url") or None


def build(spec: BackboneSpec, weights: Path | None, device: torch.device) -> Backbone:
    import open_clip

    register_local_configs()
    if spec.arch not in open_clip.list_models():
        raise BackboneError(f"open_clip has no model '{spec.arch}' (see open_clip.list_models())")
    pp = resolve_preprocess(spec)
    hub = hub_id(spec)
    if weights is not None:
        source, weights_id = str(weights), f"sha256:{file_sha256(weights)}"
    elif spec.pretrained:
        source, weights_id = spec.pretrained, f"hub:{hub or spec.pretrained}"
    else:
        source, weights_id = None, f"random-init(seed={RANDOM_INIT_SEED})"
    torch.manual_seed(RANDOM_INIT_SEED)  # same random weights in every process and every run
    try:
        with quiet_library_logs():  # open_clip warns about random init; hub clients log retries
            model, _, transform = open_clip.create_model_and_transforms(
                spec.arch,
                pretrained=source,
                device=device,
                image_mean=pp.get("mean"),
                image_std=pp.get("std"),
                image_interpolation=pp.get("interpolation"),
                image_resize_mode=pp.get("resize_mode"),
            )
    except Exception as e:  # hub download failures come in many types
        if weights is None and spec.pretrained:
            raise missing_weights(spec, hub, e) from e
        raise BackboneError(f"cannot load {spec.name} = {spec.label} from {source}: {e}") from e
    cfg = dict(model.visual.preprocess_cfg)
    size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
    preprocessing = {
        "library": "open_clip",
        "size": list(size),
        "resize_mode": cfg.get("resize_mode"),
        "interpolation": cfg.get("interpolation"),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "fill_color": cfg.get("fill_color", 0),
    }

    # For these, encode_image(x, normalize=False) is visual(x): keep the image tower only
    # (the text tower is half of SO400M's parameters).
    visual_only = isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP))
    if visual_only:
        model = model.visual

    def encode(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images) if visual_only else model.encode_image(images, normalize=False)

    return Backbone(spec, model, encode, transform, preprocessing, weights_id, tuple(size))


def meta_facts(spec: BackboneSpec) -> tuple[int, tuple[int, int], torch.nn.Module]:
    """(output dim, image size, the vision tower on the meta device): the architecture's facts, no weights."""
    import open_clip

    register_local_configs()
    visual = open_clip.create_model(spec.arch, device="meta").visual
    s = visual.preprocess_cfg["size"]
    size = tuple(s) if isinstance(s, (tuple, list)) else (s, s)
    return int(visual(torch.empty(1, 3, *size, device="meta")).shape[-1]), size, visual

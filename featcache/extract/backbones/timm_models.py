"""timm backbones: DINOv2 and any other ``timm:NAME``."""

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


def build(spec: BackboneSpec, weights: Path | None, device: torch.device) -> Backbone:
    import timm
    from timm.data import create_transform, resolve_model_data_config

    base = spec.arch.split(".")[0]
    if not timm.list_models(base):
        raise BackboneError(f"timm has no model '{spec.arch}' (see timm.list_models())")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if weights is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
        weights_id = f"sha256:{file_sha256(weights)}"
    elif spec.pretrained:
        kwargs.update(pretrained=True)
        weights_id = f"hub:timm/{spec.arch}"
    else:
        weights_id = f"random-init(seed={RANDOM_INIT_SEED})"
    torch.manual_seed(RANDOM_INIT_SEED)
    try:
        with quiet_library_logs():  # the hub client logs every retry of a download
            model = timm.create_model(spec.arch, **kwargs)
    except Exception as e:
        if weights is None and spec.pretrained:
            raise missing_weights(spec, f"timm/{spec.arch}", e) from e
        raise BackboneError(f"cannot load {spec.name} = {spec.label} from {weights}: {e}") from e
    model.to(device)
    data_cfg = resolve_model_data_config(model)
    data_cfg.update({k: v for k, v in spec.preprocess.items() if k in data_cfg})
    transform = create_transform(**data_cfg, is_training=False)
    size = tuple(data_cfg["input_size"][1:])
    preprocessing = {
        "library": "timm",
        "size": list(size),
        "crop_pct": data_cfg.get("crop_pct"),
        "crop_mode": data_cfg.get("crop_mode"),
        "interpolation": data_cfg.get("interpolation"),
        "mean": list(data_cfg["mean"]),
        "std": list(data_cfg["std"]),
    }
    return Backbone(spec, model, lambda model, images: model(images), transform, preprocessing, weights_id, size)


def meta_facts(spec: BackboneSpec) -> tuple[int, tuple[int, int], torch.nn.Module]:
    """(output dim, image size, the model on the meta device): the architecture's facts, no weights."""
    import timm
    from timm.data import resolve_model_data_config

    model = timm.create_model(spec.arch, pretrained=False, num_classes=0)
    size = tuple(resolve_model_data_config(model)["input_size"][1:])
    return int(model(torch.empty(1, 3, *size, device="meta")).shape[-1]), size, model

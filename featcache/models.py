"""Backbones: a registry of short names, and one factory that builds any of them.

A registry entry carries everything the cached numbers depend on: library, architecture, pretrained
weights, and preprocessing. ``create_backbone`` turns a name (or an explicit ``open_clip:ARCH[@TAG]``
/ ``timm:NAME``) into an image encoder plus its eval transform. A local ``weights`` file can replace
any hub download, and it never changes the preprocessing: that is pinned by the registry entry (or the
pretrained tag), so the same model gives the same features whether its weights came from the hub or a
file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

RANDOM_INIT_SEED = 0
_CONFIG_DIR = Path(__file__).parent / "model_configs"


class BackboneError(ValueError):
    """A backbone that cannot be built; the message says which one and what to do."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    library: str  # "open_clip" or "timm"
    arch: str  # open_clip model name, or timm model name (with its pretrained tag after a dot)
    pretrained: str | None = None  # open_clip pretrained tag; for timm, "hub" to load the hub weights
    preprocess: dict[str, Any] = field(default_factory=dict)  # overrides of the library's eval transform
    summary: str = ""

    @property
    def label(self) -> str:
        tag = f"@{self.pretrained}" if self.pretrained and self.library == "open_clip" else ""
        return f"{self.library}:{self.arch}{tag}"


# The paper's recipe: shorter side to 384 then a center crop (open_clip's webli config squashes instead).
_PAPER_CROP = {"resize_mode": "shortest"}

REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec("siglip-so400m", "open_clip", "ViT-SO400M-14-SigLIP-384", "webli", _PAPER_CROP,
                     "SigLIP SO400M/14 at 384 px: the paper's best backbone"),
        BackboneSpec("siglip-so400m-224", "open_clip", "ViT-SO400M-14-SigLIP", "webli", _PAPER_CROP,
                     "SigLIP SO400M/14 at 224 px"),
        BackboneSpec("siglip2-so400m", "open_clip", "ViT-SO400M-14-SigLIP2-378", "webli", {},
                     "SigLIP 2 SO400M/14 at 378 px"),
        BackboneSpec("clip-vit-h14", "open_clip", "ViT-H-14", "laion2b_s32b_b79k", {},
                     "OpenCLIP ViT-H/14 trained on LAION-2B (GUIEC winners' backbone)"),
        BackboneSpec("clip-vit-l14", "open_clip", "ViT-L-14", "openai", {}, "OpenAI CLIP ViT-L/14"),
        BackboneSpec("eva02-l14", "open_clip", "EVA02-L-14", "merged2b_s4b_b131k", {}, "EVA02-CLIP L/14"),
        BackboneSpec("metaclip-h14", "open_clip", "ViT-H-14-quickgelu", "metaclip_fullcc", {}, "MetaCLIP ViT-H/14"),
        BackboneSpec("dinov2-l14", "timm", "vit_large_patch14_dinov2.lvd142m", "hub", {},
                     "DINOv2 ViT-L/14 (self-supervised, 518 px)"),
        BackboneSpec("tiny-vit", "open_clip", "featcache-tiny-vit", None, {},
                     "A 0.4M-parameter ViT (32 px, 16 px patches) with seeded random weights, for tests and the offline demo"),
    ]
}


def _register_local_configs() -> None:
    import open_clip

    if "featcache-tiny-vit" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def resolve_spec(name: str) -> BackboneSpec:
    """A registry name, ``open_clip:ARCH[@TAG]`` or ``timm:NAME`` to a spec."""
    if name in REGISTRY:
        return REGISTRY[name]
    library, sep, rest = name.partition(":")
    if sep and rest and library == "open_clip":
        arch, _, tag = rest.partition("@")
        return BackboneSpec(name, "open_clip", arch, tag or None)
    if sep and rest and library == "timm":
        # timm names carry their pretrained tag after a dot; without --weights we load from the hub.
        return BackboneSpec(name, "timm", rest, "hub")
    raise BackboneError(
        f"unknown model '{name}': use one of {', '.join(REGISTRY)}, or open_clip:ARCH[@TAG], or timm:NAME"
    )


def file_sha256(path: str | os.PathLike, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class Backbone(nn.Module):
    """A frozen image encoder: ``forward(images) -> (B, dim)`` raw features, before any normalisation."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, encode: Callable, transform: Callable,
                 preprocessing: dict[str, Any], weights: str, image_size: tuple[int, int]):
        super().__init__()
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self._encode = encode
        self.transform = transform
        self.preprocessing = preprocessing
        self.weights = weights  # what the weights are: "sha256:<hex>", "hub:<id>" or "random-init(seed=0)"
        self.image_size = image_size
        self.dim = self._probe_dim()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images)

    @torch.inference_mode()
    def _probe_dim(self) -> int:
        device = next(self.model.parameters()).device
        return int(self(torch.zeros(1, 3, *self.image_size, device=device)).shape[-1])

    def describe(self) -> dict[str, Any]:
        """What the cache records about the backbone (and hashes into its key)."""
        return {
            "name": self.spec.name,
            "library": self.spec.library,
            "arch": self.spec.arch,
            "pretrained": self.spec.pretrained,
            "weights": self.weights,
            "dim": self.dim,
        }


def create_backbone(name: str, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Backbone:
    """Build the named backbone on ``device``, from ``weights`` (a local file) when given."""
    spec = resolve_spec(name)
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise BackboneError(f"weights file not found: {weights}")
    build = _build_open_clip if spec.library == "open_clip" else _build_timm
    return build(spec, weights, torch.device(device))


def _missing_weights(spec: BackboneSpec, hub_id: str | None, err: BaseException) -> BackboneError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    reason = reason if len(reason) <= 160 else reason[:157].rsplit(" ", 1)[0] + "..."
    where = f" (hub id {hub_id})" if hub_id else ""
    return BackboneError(
        f"cannot load pretrained weights for {spec.name} = {spec.label}{where}: {reason}. "
        f"Download the checkpoint on a machine with network and pass it with --weights FILE."
    )


@contextmanager
def _quiet_root_logger():
    """open_clip logs warnings and errors on the root logger; we report failures ourselves, in one line."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


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


def _hub_id(spec: BackboneSpec) -> str | None:
    import open_clip

    if not spec.pretrained:
        return None
    pcfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    return pcfg.get("hf_hub") or pcfg.get("url") or None


def _build_open_clip(spec: BackboneSpec, weights: Path | None, device: torch.device) -> Backbone:
    import open_clip

    _register_local_configs()
    if spec.arch not in open_clip.list_models():
        raise BackboneError(f"open_clip has no model '{spec.arch}' (see open_clip.list_models())")
    pp = resolve_preprocess(spec)
    hub_id = _hub_id(spec)
    if weights is not None:
        source, weights_id = str(weights), f"sha256:{file_sha256(weights)}"
    elif spec.pretrained:
        source, weights_id = spec.pretrained, f"hub:{hub_id or spec.pretrained}"
    else:
        source, weights_id = None, f"random-init(seed={RANDOM_INIT_SEED})"
    torch.manual_seed(RANDOM_INIT_SEED)  # same random weights in every process and every run
    try:
        with _quiet_root_logger():  # open_clip warns on the root logger about random init
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
            raise _missing_weights(spec, hub_id, e) from e
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

    def encode(images: torch.Tensor) -> torch.Tensor:
        return model(images) if visual_only else model.encode_image(images, normalize=False)

    return Backbone(spec, model, encode, transform, preprocessing, weights_id, tuple(size))


def _build_timm(spec: BackboneSpec, weights: Path | None, device: torch.device) -> Backbone:
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
        model = timm.create_model(spec.arch, **kwargs)
    except Exception as e:
        if weights is None and spec.pretrained:
            raise _missing_weights(spec, f"timm/{spec.arch}", e) from e
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
    return Backbone(spec, model, lambda images: model(images), transform, preprocessing, weights_id, size)


def describe_registry() -> list[dict[str, Any]]:
    """One row per registry entry with output dim, image size and vision parameter count, computed
    from the architecture on the meta device (no weights are loaded or downloaded)."""
    rows = []
    for spec in REGISTRY.values():
        with _quiet_root_logger():
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
            if spec.library == "open_clip":
                import open_clip

                _register_local_configs()
                visual = open_clip.create_model(spec.arch, device="meta").visual
                s = visual.preprocess_cfg["size"]
                size = tuple(s) if isinstance(s, (tuple, list)) else (s, s)
            else:
                import timm
                from timm.data import resolve_model_data_config

                visual = timm.create_model(spec.arch, pretrained=False, num_classes=0)
                size = tuple(resolve_model_data_config(visual)["input_size"][1:])
            out = visual(torch.empty(1, 3, *size, device="meta"))
        params = sum(p.numel() for p in visual.parameters())
        return int(out.shape[-1]), int(size[0]), params
    except Exception:  # listing must not fail because one architecture cannot be built here
        return None, None, None

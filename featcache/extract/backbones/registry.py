"""The backbone registry: short names to everything the cached numbers depend on.

A registry entry carries the library, architecture, pretrained weights and preprocessing. Any other
model can be named explicitly as ``open_clip:ARCH[@TAG]`` or ``timm:NAME``. A local ``weights`` file
can replace any hub download, and it never changes the preprocessing: that is pinned by the registry
entry (or the pretrained tag), so the same model gives the same features whether its weights came from
the hub or a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
        BackboneSpec("clipa-h14-336", "open_clip", "ViT-H-14-CLIPA-336", "datacomp1b", {},
                     "CLIPA-v2 ViT-H/14 at 336 px, trained on DataComp-1B"),
        BackboneSpec("convnext-xxl-clip", "open_clip", "convnext_xxlarge", "laion2b_s34b_b82k_augreg", {},
                     "OpenCLIP ConvNeXt-XXLarge trained on LAION-2B (the original code's ConvNeXt)"),
        # SAM has no image-level output: its encoder ends in a neck whose 256-channel 64x64 map is what
        # SAM's mask decoder reads. The embedding is that map averaged over positions (timm's default
        # global_pool="avg"): the last, most semantic layer, in a form any head can take.
        BackboneSpec("sam-vit-h", "timm", "samvit_huge_patch16.sa1b", "hub", {},
                     "SAM ViT-H image encoder (1024 px): its neck's 256-channel map, averaged over positions"),
        BackboneSpec("tiny-vit", "open_clip", "featcache-tiny-vit", None, {},
                     "A 0.4M-parameter ViT (32 px, 16 px patches) with seeded random weights, for tests and the offline demo"),
    ]
}


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

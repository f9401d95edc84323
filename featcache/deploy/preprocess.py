"""A backbone's eval preprocessing as a TorchScript-able module: raw images in, the model's input out.

The cache records how its features were preprocessed (``FeatureCache.meta["preprocessing"]``: size,
resize mode, interpolation, mean, std). Extraction runs that on PIL images (torchvision / timm
transforms); an exported model must do the same inside, on a tensor, with torch alone. Geometry is
reproduced exactly (torchvision's sizes and crop offsets, its rounding included); pixel values differ
slightly, because torch's antialiased resize is not PIL's (they agree to a cosine of about 0.999 on
embeddings; the tests hold exports to 0.995).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# resize modes: "shortest" (shorter side to `resize`, then a center crop to `size`) and "squash" (the
# whole image to `resize` x `resize`, then a center crop to `size`; with resize == size, no crop).
MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")


class PreprocessError(ValueError):
    """Preprocessing that the export cannot reproduce; the message says which part."""


def plan(preprocessing: dict[str, Any]) -> dict[str, Any]:
    """The recorded preprocessing of a cache as one plan: {size (h, w), resize (the shorter side, or the
    squashed size), mode, interpolation, mean, std}. Covers open_clip's shortest/squash and timm's
    center/squash crops (timm resizes to floor(size / crop_pct) first)."""
    library = preprocessing.get("library")
    size = tuple(int(s) for s in preprocessing["size"])
    interpolation = preprocessing.get("interpolation") or "bicubic"
    if library == "open_clip":
        mode = preprocessing.get("resize_mode") or "shortest"
        resize = size[0]
    elif library == "timm":
        crop_mode = preprocessing.get("crop_mode") or "center"
        mode = {"center": "shortest", "squash": "squash"}.get(crop_mode, crop_mode)
        resize = math.floor(size[0] / (preprocessing.get("crop_pct") or 0.875))
    else:
        raise PreprocessError(f"preprocessing of library {library!r} cannot be exported (features imported from elsewhere?)")
    if mode not in MODES:
        raise PreprocessError(f"resize mode {mode!r} cannot be exported yet (supported: {', '.join(MODES)})")
    if interpolation not in INTERPOLATIONS:
        raise PreprocessError(f"interpolation {interpolation!r} cannot be exported (supported: {', '.join(INTERPOLATIONS)})")
    if size[0] != size[1]:
        raise PreprocessError(f"non-square input {size[0]}x{size[1]} cannot be exported yet")
    return {"size": list(size), "resize": resize, "mode": mode, "interpolation": interpolation,
            "mean": [float(m) for m in preprocessing["mean"]], "std": [float(s) for s in preprocessing["std"]]}


def _crop_offset(extra: int) -> int:
    """torchvision's center-crop offset int(round(extra / 2)), with Python's round-half-to-even."""
    half = extra // 2
    return half + (half % 2) if extra % 2 else half


class Preprocess(nn.Module):
    """(B, 3, H, W) RGB images, float 0..255 (or uint8), any H and W -> (B, 3, S, S) normalised input."""

    def __init__(self, plan: dict[str, Any]):
        super().__init__()
        self.size: int = int(plan["size"][0])
        self.resize: int = int(plan["resize"])
        self.squash: bool = plan["mode"] == "squash"
        self.interpolation: str = plan["interpolation"]
        self.register_buffer("mean", torch.tensor(plan["mean"]).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(plan["std"]).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        h, w = x.shape[2], x.shape[3]
        if self.squash:
            nh, nw = self.resize, self.resize
        elif h <= w:  # torchvision Resize(int): the shorter side to `resize`, the longer one truncated
            nh, nw = self.resize, int(self.resize * w / h)
        else:
            nh, nw = int(self.resize * h / w), self.resize
        if nh != h or nw != w:
            x = F.interpolate(x, size=[nh, nw], mode=self.interpolation, align_corners=False, antialias=True)
            x = x.round().clamp(0.0, 255.0)  # PIL resizes in 8 bits
        top, left = _crop_offset(nh - self.size), _crop_offset(nw - self.size)
        x = x[:, :, top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std

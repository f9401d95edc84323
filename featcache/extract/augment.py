"""Augmented views, computed once at extraction: the training-time augmentation of the original code
(UniFEx) without running the backbone again every epoch.

Each row gets ``views`` augmented copies of its image, each drawn from its own seed (``seed``, row,
view), so a resumed or multi-rank extraction writes exactly the views of a single run. The clean eval
view stays in ``features``; the views go to the cache's ``augmented`` array (N, V, D).

Recipes (``--augment``), after UniFEx's training transforms:

- ``flip``: the eval transform applied to the horizontally mirrored image (one view, no randomness).
- ``openclip``: a random square crop of 90-100 % of the image area, resized to the model's input size.
- ``siglip``: torchvision's default random crop (8-100 % of the area, aspect ratio 3/4 to 4/3), then
  colour jitter: brightness, contrast and saturation factors each uniform in [0.6, 1.4], applied in a
  random order (as torchvision's ColorJitter does).
- ``custom``: the ``openclip`` crop, a horizontal flip with probability 1/2, then the colour jitter.

The crop follows torchvision's RandomResizedCrop (ten tries at a crop that fits, else the largest
centred crop of the allowed aspect ratio); it is written out here so that the draws come from the
(row, view) seed rather than torch's global random state. Interpolation, mean and std are the
backbone's own (from the cache's recorded preprocessing).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

AUGMENTS = ("flip", "openclip", "siglip", "custom")
# augment -> (crop scale: fraction of the image area, crop ratio: width / height), as UniFEx's transforms
CROPS = {"openclip": ((0.9, 1.0), (1.0, 1.0)), "siglip": ((0.08, 1.0), (3 / 4, 4 / 3)), "custom": ((0.9, 1.0), (1.0, 1.0))}
JITTER = (0.6, 1.4)  # brightness, contrast and saturation factors
FLIP_P = 0.5  # custom only


class AugmentError(ValueError):
    """Views or augmentation options that cannot be used; the message names the option."""


@dataclass(frozen=True)
class Augmentation:
    """What the ``augmented`` array holds; recorded in the cache (and its key) as ``describe()``."""

    augment: str
    views: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise AugmentError(f"--augment {self.augment}: expected one of {', '.join(AUGMENTS)}")
        if self.views < 1:
            raise AugmentError(f"--views {self.views}: need at least 1 (leave out --views for no augmented views)")
        if self.augment == "flip" and self.views != 1:
            raise AugmentError(f"--augment flip has one view (the mirrored image), not {self.views}: use --views 1")

    def describe(self) -> dict[str, Any]:
        recipe: dict[str, Any] = {}
        if self.augment in CROPS:
            scale, ratio = CROPS[self.augment]
            recipe = {"crop_scale": list(scale), "crop_ratio": [round(r, 6) for r in ratio]}
        if self.augment in ("siglip", "custom"):
            recipe["jitter"] = list(JITTER)
        if self.augment == "custom":
            recipe["flip_p"] = FLIP_P
        return {**asdict(self), **recipe}

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> "Augmentation | None":
        if not meta:
            return None
        return cls(meta["augment"], int(meta["views"]), int(meta.get("seed", 0)))


def view_rng(seed: int, row: int, view: int) -> np.random.Generator:
    """The random stream of one (row, view): the same in every process, rank and run."""
    return np.random.default_rng([seed, row, view])


def crop_box(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering ``scale`` of the area with aspect ``ratio``;
    after ten misses, the largest centred crop whose aspect ratio lies in ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ViewTransform:
    """``(image, row) -> (V, 3, H, W)``: the row's augmented views, ready for the backbone. Picklable
    (it runs in DataLoader workers)."""

    def __init__(self, augmentation: Augmentation, eval_transform: Callable, preprocessing: dict[str, Any]):
        self.augmentation = augmentation
        self.eval_transform = eval_transform
        self.size = [int(s) for s in preprocessing["size"]]
        self.interpolation = preprocessing.get("interpolation") or "bicubic"
        self.mean = [float(m) for m in preprocessing["mean"]]
        self.std = [float(s) for s in preprocessing["std"]]

    def __call__(self, image: Image.Image, row: int) -> torch.Tensor:
        a = self.augmentation
        if a.augment == "flip":
            return self.eval_transform(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).unsqueeze(0)
        return torch.stack([self.view(image, view_rng(a.seed, row, v)) for v in range(a.views)])

    def view(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        augment = self.augmentation.augment
        top, left, h, w = crop_box(rng, *image.size, *CROPS[augment])
        out = TF.resized_crop(image, top, left, h, w, self.size, InterpolationMode(self.interpolation), antialias=True)
        if augment == "custom" and rng.random() < FLIP_P:
            out = TF.hflip(out)
        if augment in ("siglip", "custom"):
            factors = rng.uniform(JITTER[0], JITTER[1], size=3)
            adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
            for k in rng.permutation(3):
                out = adjust[k](out, float(factors[k]))
        return TF.normalize(TF.to_tensor(out), self.mean, self.std)

"""Margin-based softmax losses: the formulas (``formulas``, one short class per loss), the block-wise
fused cross-entropy that trains them (``fused``), and the registry of names (``registry``).

Margins are in RADIANS for the angular losses (arcface family, airface, curricularface, adaface).
"""

from featcache.train.losses.base import MarginSoftmaxLoss
from featcache.train.losses.formulas import (
    AdaCosLoss,
    AdaFaceLoss,
    AirFaceLoss,
    ArcFaceLoss,
    CosFaceLoss,
    CurricularFaceLoss,
    DynamicArcFaceLoss,
    NormFaceLoss,
    SoftmaxLoss,
    SubCenterArcFaceLoss,
)
from featcache.train.losses.registry import LOSSES, LossSpec, build_loss, canonical_name, loss_names

__all__ = [
    "LOSSES",
    "LossSpec",
    "MarginSoftmaxLoss",
    "SoftmaxLoss",
    "NormFaceLoss",
    "CosFaceLoss",
    "ArcFaceLoss",
    "SubCenterArcFaceLoss",
    "DynamicArcFaceLoss",
    "AirFaceLoss",
    "CurricularFaceLoss",
    "AdaFaceLoss",
    "AdaCosLoss",
    "build_loss",
    "canonical_name",
    "loss_names",
]

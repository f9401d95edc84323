"""The loss registry: ``--loss NAME`` to its class, its options and their defaults. A new loss is a
class in ``formulas`` and one line in ``LOSSES``.

Build losses by name with :func:`build_loss`; :data:`LOSSES` describes them (defaults, one-line formula).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from featcache.train.losses import formulas
from featcache.train.losses.base import MarginSoftmaxLoss, fail


@dataclass(frozen=True)
class LossSpec:
    """Registry entry: ``defaults`` lists every option with its default (None = required)."""

    name: str
    cls: type[MarginSoftmaxLoss]
    defaults: dict[str, float | int | str | None]
    summary: str


_COMMON_DEFAULTS: dict[str, float | int | str | None] = {"sample_fraction": 1.0, "precision": "fp32"}


def _spec(cls: type[MarginSoftmaxLoss]) -> LossSpec:
    params = inspect.signature(cls.__init__).parameters.values()
    own = {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    return LossSpec(cls.name, cls, {**own, **_COMMON_DEFAULTS}, cls.summary)


LOSSES: dict[str, LossSpec] = {
    cls.name: _spec(cls)
    for cls in (
        formulas.SoftmaxLoss,
        formulas.NormFaceLoss,
        formulas.CosFaceLoss,
        formulas.ArcFaceLoss,
        formulas.SubCenterArcFaceLoss,
        formulas.DynamicArcFaceLoss,
        formulas.AirFaceLoss,
        formulas.CurricularFaceLoss,
        formulas.AdaFaceLoss,
        formulas.AdaCosLoss,
    )
}


def loss_names() -> list[str]:
    """Registered loss names, in table order."""
    return list(LOSSES)


def canonical_name(name: str) -> str:
    """The registry's name for ``name`` (case and ``_``/``-`` do not matter); ValueError listing the valid names."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in LOSSES:
        fail(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    return key


def build_loss(name: str, num_classes: int, embed_dim: int, **hparams: Any) -> MarginSoftmaxLoss:
    """Build a registered loss. Options left out, or passed as None, take their defaults.

    Raises ValueError (one line) for an unknown name, an option the loss does not have, a missing
    required option, or an impossible value.
    """
    key = canonical_name(name)
    spec = LOSSES[key]
    hparams = {k: v for k, v in hparams.items() if v is not None}
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        fail(f"unknown option(s) {', '.join(unknown)} for loss {key!r}; valid options: {', '.join(spec.defaults)}")
    missing = [k for k, v in spec.defaults.items() if v is None and k not in hparams]
    if missing:
        fail(f"loss {key!r} requires {', '.join(missing)}")
    return spec.cls(num_classes, embed_dim, **hparams)

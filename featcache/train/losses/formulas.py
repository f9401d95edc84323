"""The margin losses, one short class each, as their papers write them (ArcFace, CosFace, Sub-center ArcFace,
Li-ArcFace, CurricularFace, AdaFace, AdaCos, NormFace: each class's docstring gives its logits).

Margins are in RADIANS for the angular losses (arcface family, airface, curricularface, adaface);
cosface's margin is subtracted from the cosine itself. A loss that changes only the target column
sets ``scale`` and gives ``_target_logit``; one that changes every column gives ``_scaled_logits``
(and, to train on the hand-written fused softmax, ``_others_``); running statistics move in
``_update_state``. Adding a loss: one class here and one line in ``registry``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from featcache.train.losses.base import (
    MarginSoftmaxLoss,
    as_margin,
    as_rate,
    as_real,
    as_scale,
    fail,
    gather_target,
    set_target,
)
from featcache.train.losses.fused import Batch, BatchStats

# Floor under 1 - cos^2 before the square root: keeps d sin/d cos finite when cos = ±1 exactly.
_SIN_EPS = 1e-12
# acos is only used where the angle itself is needed; its gradient is infinite at ±1.
_ACOS_CLAMP = 1.0 - 1e-7
_ADAFACE_EPS = 1e-3


def _cos_plus(cos: Tensor, margin: float | Tensor) -> Tensor:
    """cos(θ + m) by the angle-sum identity, with sin θ = sqrt(1 − cos²θ) (no acos)."""
    margin = torch.as_tensor(margin, dtype=cos.dtype, device=cos.device)
    sin = (1.0 - cos * cos).clamp_min(_SIN_EPS).sqrt()
    return cos * torch.cos(margin) - sin * torch.sin(margin)


def _arc_target(cos: Tensor, margin: float | Tensor) -> Tensor:
    """ArcFace target cosine: cos(θ + m), or cos θ − m·sin m once θ + m would pass π.

    The fallback keeps the target logit monotonic in θ (cos(θ + m) turns back up past π).
    ``margin`` is in radians, a float or a (B,) tensor of per-sample margins.
    """
    margin = torch.as_tensor(margin, dtype=cos.dtype, device=cos.device)
    past_pi = cos <= torch.cos(math.pi - margin)
    return torch.where(past_pi, cos - margin * torch.sin(margin), _cos_plus(cos, margin))


class SoftmaxLoss(MarginSoftmaxLoss):
    """The no-margin baseline: a plain linear classifier, logits = x · W_c.

    No normalisation of embedding or weight, no scale, no margin, no bias.
    """

    name = "softmax"
    summary = "plain linear classifier: logit_c = x·W_c (no normalisation, scale, margin or bias)"
    normalise = False
    scale = 1.0

    def __init__(self, num_classes: int, embed_dim: int, **common: Any) -> None:
        super().__init__(num_classes, embed_dim, **common)

    def _target_logit(self, cos_y: Tensor, labels: Tensor, emb: Tensor) -> Tensor:
        return cos_y


class NormFaceLoss(MarginSoftmaxLoss):
    """Normalised softmax: logits s·cos θ_c, no margin."""

    name = "normface"
    summary = "s·cos θ_c for every class (normalised softmax, no margin)"

    def __init__(self, num_classes: int, embed_dim: int, *, scale: float = 16.0, **common: Any) -> None:
        super().__init__(num_classes, embed_dim, **common)
        self.scale = as_scale(scale)

    def _target_logit(self, cos_y: Tensor, labels: Tensor, emb: Tensor) -> Tensor:
        return cos_y * self.scale


class CosFaceLoss(MarginSoftmaxLoss):
    """CosFace: target s·(cos θ_y − m), others s·cos θ_c. The margin is additive on the cosine."""

    name = "cosface"
    summary = "target s·(cos θ_y − m), others s·cos θ_c (m subtracted from the cosine)"

    def __init__(
        self, num_classes: int, embed_dim: int, *, scale: float = 30.0, margin: float = 0.35, **common: Any
    ) -> None:
        super().__init__(num_classes, embed_dim, **common)
        self.scale = as_scale(scale)
        self.margin = as_margin("margin", margin)

    def _target_logit(self, cos_y: Tensor, labels: Tensor, emb: Tensor) -> Tensor:
        return (cos_y - self.margin) * self.scale


class ArcFaceLoss(MarginSoftmaxLoss):
    """ArcFace: target s·cos(θ_y + m) (m in radians), others s·cos θ_c.

    Once θ_y + m would pass π (cos θ_y <= cos(π − m)) the target is s·(cos θ_y − m·sin m).
    """

    name = "arcface"
    summary = "target s·cos(θ_y + m), or s·(cos θ_y − m·sin m) once θ_y + m > π; others s·cos θ_c (m in rad)"

    def __init__(
        self, num_classes: int, embed_dim: int, *, scale: float = 30.0, margin: float = 0.5, **common: Any
    ) -> None:
        super().__init__(num_classes, embed_dim, **common)
        self.scale = as_scale(scale)
        self.margin = as_margin("margin", margin)

    def _target_margin(self, labels: Tensor) -> float | Tensor:
        return self.margin

    def _target_logit(self, cos_y: Tensor, labels: Tensor, emb: Tensor) -> Tensor:
        return _arc_target(cos_y, self._target_margin(labels)) * self.scale


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace: k weights per class, cos θ_c = max over them, then ArcFace (m in radians)."""

    name = "subcenter-arcface"
    summary = "arcface on cos θ_c = max over the class's k sub-center cosines"

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        scale: float = 30.0,
        margin: float = 0.5,
        sub_centers: int = 3,
        **common: Any,
    ) -> None:
        super().__init__(num_classes, embed_dim, scale=scale, margin=margin, sub_centers=sub_centers, **common)


class DynamicArcFaceLoss(ArcFaceLoss):
    """ArcFace with a per-class margin (radians) from the training class sizes.

    m_c = m_min + ½(m_max − m_min)(1 + cos(π·n̂_c)), n̂_c = (n_c − n_min)/(n_max − n_min): the rarest class
    gets m_max, the largest m_min. ``class_counts[c]`` is the training count of class id c; the margins
    live in the ``margins`` buffer, indexed by class id.
    """

    name = "dynamic-arcface"
    summary = "arcface with per-class m_c = m_min + ½(m_max − m_min)(1 + cos(π·n̂_c)), n̂_c = count scaled to [0, 1]"

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        class_counts: Any,
        scale: float = 30.0,
        margin_min: float = 0.2,
        margin_max: float = 0.5,
        **common: Any,
    ) -> None:
        margin_min = as_margin("margin_min", margin_min)
        margin_max = as_margin("margin_max", margin_max)
        if margin_min > margin_max:
            fail(f"margin_min must be <= margin_max, got {margin_min} > {margin_max}")
        super().__init__(num_classes, embed_dim, scale=scale, margin=margin_max, **common)
        self.margin_min, self.margin_max = margin_min, margin_max
        self.register_buffer("margins", self._margins_from_counts(class_counts).float())

    def _margins_from_counts(self, class_counts: Any) -> Tensor:
        try:
            counts = torch.as_tensor(class_counts, dtype=torch.float64).cpu()
        except (TypeError, ValueError, RuntimeError):
            fail(f"class_counts must be a 1-D sequence of numbers, got {type(class_counts).__name__}")
        if counts.ndim != 1 or counts.numel() != self.num_classes:
            fail(
                f"class_counts must be 1-D with one count per class id (length {self.num_classes}), "
                f"got shape {tuple(counts.shape)}"
            )
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            fail("class_counts must be finite and >= 0")
        span = counts.max() - counts.min()
        scaled = (counts - counts.min()) / span if span > 0 else torch.zeros_like(counts)
        return self.margin_min + 0.5 * (self.margin_max - self.margin_min) * (1 + torch.cos(math.pi * scaled))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin_min={self.margin_min}, margin_max={self.margin_max}"

    def _target_margin(self, labels: Tensor) -> Tensor:
        return self.margins[labels]


class AirFaceLoss(MarginSoftmaxLoss):
    """AirFace / Li-ArcFace: logits linear in the angle, s·(π − 2(θ_c + m·[c = y]))/π (m in radians).

    Default m = 0.45 as in the Li-ArcFace paper. θ = acos of the cosine clamped to ±(1 − 1e-7).
    """

    name = "airface"
    summary = "s·(π − 2(θ_c + m·[c = y]))/π for every class (linear in the angle, m in rad)"

    def __init__(
        self, num_classes: int, embed_dim: int, *, scale: float = 30.0, margin: float = 0.45, **common: Any
    ) -> None:
        super().__init__(num_classes, embed_dim, **common)
        self.scale = as_scale(scale)
        self.margin = as_margin("margin", margin)

    def _scaled_logits(self, b: Batch) -> Tensor:
        theta = torch.acos(b.cos.clamp(-_ACOS_CLAMP, _ACOS_CLAMP))
        slope = 2.0 * self.scale / math.pi  # s(π − 2θ)/π = s − slope·θ
        logits = theta.mul(-slope).add_(self.scale)
        target = self.scale - slope * (gather_target(theta, b.target) + self.margin)
        return set_target(logits, b.target, target)

    def _target_logit(self, cos_y: Tensor, labels: Tensor, emb: Tensor) -> Tensor:
        theta_y = torch.acos(cos_y.clamp(-_ACOS_CLAMP, _ACOS_CLAMP))
        return self.scale - 2.0 * self.scale / math.pi * (theta_y + self.margin)

    def _others_(self, cos: Tensor, cos_y: Tensor, deriv: Tensor) -> None:
        slope = 2.0 * self.scale / math.pi
        # d/dc (s − slope·acos c) = slope / sqrt(1 − c²) inside the clamp, 0 past it (rare: one pass to
        # find out, the masks only then).
        low, high = torch.aminmax(cos)
        beyond = cos.abs() > _ACOS_CLAMP if low < -_ACOS_CLAMP or high > _ACOS_CLAMP else None
        torch.addcmul(cos.new_ones(()), cos, cos, value=-1.0, out=deriv).rsqrt_().mul_(slope)
        if beyond is not None:
            deriv.masked_fill_(beyond, 0.0)
            cos.clamp_(-_ACOS_CLAMP, _ACOS_CLAMP)
        cos.acos_().mul_(-slope).add_(self.scale)


class CurricularFaceLoss(MarginSoftmaxLoss):
    """CurricularFace: ArcFace target; negatives harder than it are re-weighted by a running t.

    Target s·cos(θ_y + m) (ArcFace fallback past π, m in radians). A negative with
    cos θ_c > cos(θ_y + m) becomes s·cos θ_c·(t + cos θ_c); the others stay s·cos θ_c.
    t (buffer, starts at 0) ← momentum·mean(cos θ_y) + (1 − momentum)·t on each training forward,
    before the logits are formed, without gradient.
    """

    name = "curricularface"
    summary = "target s·cos(θ_y + m); negatives above cos(θ_y + m) get s·cos θ_c·(t + cos θ_c), t = EMA of cos θ_y"

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        scale: float = 30.0,
        margin: float = 0.5,
        momentum: float = 0.01,
        **common: Any,
    ) -> None:
        super().__init__(num_classes, embed_dim, **common)
        self.scale = as_scale(scale)
        self.margin = as_margin("margin", margin)
        self.momentum = as_rate("momentum", momentum)
        self.register_buffer("t", torch.zeros(()))

    def _update_state(self, s: BatchStats) -> None:
        self.t.lerp_(s.target_cos.mean(), self.momentum)

    def _scaled_logits(self, b: Batch) -> Tensor:
        cos_y = gather_target(b.cos, b.target)
        # Hardness is judged against cos(θ_y + m) itself, not the fallback value (as upstream).
        hard = b.cos > _cos_plus(cos_y, self.margin).detach()[:, None]
        logits = torch.where(hard, b.cos * (b.cos + self.t), b.cos).mul_(self.scale)
        return set_target(logits, b.target, _arc_target(cos_y, self.margin) * self.scale)

    def _target_logit(self, cos_y: Tensor, labels: Tensor, emb: Tensor) -> Tensor:
        return _arc_target(cos_y, self.margin) * self.scale

    def _others_(self, cos: Tensor, cos_y: Tensor, deriv: Tensor) -> None:
        # With h = [c > cos(θ_y + m)] and A = h·(c + t − 1): logit = s·c·(1 + A), d/dc = s·(1 + A + h·c).
        hard = torch.gt(cos, _cos_plus(cos_y, self.margin)[:, None], out=deriv)
        a = self._workspace("curricular", tuple(cos.shape), cos.dtype, cos.device)
        torch.add(cos, float(self.t) - 1.0, out=a).mul_(hard)
        hard.mul_(cos).add_(a).add_(1.0).mul_(self.scale)
        cos.addcmul_(cos, a).mul_(self.scale)


class AdaFaceLoss(MarginSoftmaxLoss):
    """AdaFace: margin adapted by the raw embedding norm (m in radians for the angular part).

    ‖x‖ is clipped to [1e-3, 100] and detached; running mean μ and std σ (buffers, start 20 and 100)
    move at rate ``momentum`` on each training forward before use. ẑ = clip(h·(‖x‖ − μ)/(σ + 1e-3), −1, 1).
    Cosines are clamped to ±(1 − 1e-3); target s·(cos(clip(θ_y − m·ẑ, 1e-3, π − 1e-3)) − (m + m·ẑ)),
    others s·cos θ_c.
    """

    name = "adaface"
    others_clamp = 1.0 - _ADAFACE_EPS
    summary = "target s·(cos(θ_y − m·ẑ) − m·(1 + ẑ)), ẑ = clip(h·(‖x‖ − μ)/σ, −1, 1), μ, σ running norm stats"

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        scale: float = 64.0,
        margin: float = 0.4,
        h: float = 0.333,
        momentum: float = 0.01,
        **common: Any,
    ) -> None:
        super().__init__(num_classes, embed_dim, **common)
        self.scale = as_scale(scale)
        self.margin = as_margin("margin", margin)
        self.h = as_real("h", h, lambda v: v >= 0, ">= 0")
        self.momentum = as_rate("momentum", momentum)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    @staticmethod
    def _norms(emb: Tensor) -> Tensor:
        return emb.detach().norm(dim=1).clamp(_ADAFACE_EPS, 100.0)

    def _update_state(self, s: BatchStats) -> None:
        norms = self._norms(s.emb)
        # Unbiased std as upstream; a batch of one has no spread.
        std = norms.std() if norms.numel() > 1 else norms.new_zeros(())
        self.batch_mean.lerp_(norms.mean(), self.momentum)
        self.batch_std.lerp_(std, self.momentum)

    def _target_logit(self, cos_y: Tensor, labels: Tensor, emb: Tensor) -> Tensor:
        eps = _ADAFACE_EPS
        z = (self.h * (self._norms(emb) - self.batch_mean) / (self.batch_std + eps)).clamp(-1.0, 1.0)
        theta_y = torch.acos(cos_y.clamp(-1 + eps, 1 - eps))
        target = torch.cos((theta_y - self.margin * z).clamp(eps, math.pi - eps)) - self.margin * (1 + z)
        return target * self.scale


class AdaCosLoss(MarginSoftmaxLoss):
    """AdaCos: no margin, logits s·cos θ_c with an adaptive scale (buffer ``scale``).

    s starts at √2·ln(C − 1). Each training forward, before the logits and without gradient:
    B_avg = mean over samples of Σ_{c≠y} exp(s·cos θ_c), θ_med = median target angle (the lower middle
    value for even batches, as torch.median), s ← ln(B_avg) / cos(min(π/4, θ_med)).
    """

    name = "adacos"
    summary = "s·cos θ_c, s₀ = √2·ln(C − 1), s ← ln(mean Σ_{c≠y} exp(s·cos θ_c)) / cos(min(π/4, median θ_y))"

    def __init__(self, num_classes: int, embed_dim: int, **common: Any) -> None:
        # With 2 classes s starts at sqrt(2)·ln(1) = 0, every logit is 0 and s can never move.
        if isinstance(num_classes, int) and num_classes < 3:
            fail(f"adacos needs at least 3 classes (its starting scale sqrt(2)·ln(C - 1) is 0 for C = 2), got {num_classes}")
        super().__init__(num_classes, embed_dim, **common)
        self.register_buffer("scale", torch.tensor(math.sqrt(2.0) * math.log(self.num_classes - 1)))

    def _update_state(self, s: BatchStats) -> None:
        # log Σ_{c≠y} exp(s·cos θ_c) over the whole batch, a block of rows at a time, in place in the
        # block's scratch scores (torch.logsumexp would allocate two temporaries of a block's size).
        parts = []
        for rows, cos in s.cosines():
            logits = cos.mul_(self.scale).scatter_(1, s.target[rows, None], -math.inf)
            peak = logits.amax()
            parts.append(peak + logits.sub_(peak).exp_().sum().log())
        log_b_avg = torch.logsumexp(torch.stack(parts), dim=0) - math.log(s.target.numel())
        theta_med = torch.acos(s.target_cos.clamp(-_ACOS_CLAMP, _ACOS_CLAMP)).median()
        self.scale.copy_(log_b_avg / torch.cos(theta_med.clamp(max=math.pi / 4)))

    def _target_logit(self, cos_y: Tensor, labels: Tensor, emb: Tensor) -> Tensor:
        return cos_y * self.scale

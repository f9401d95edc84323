"""Margin-based softmax losses for training retrieval heads on cached features.

Every loss owns its class weights ``weight`` of shape ``(num_classes * k, embed_dim)``; row ``c * k + j``
is sub-center ``j`` of class ``c`` (k = 1 except for ``subcenter-arcface``). A forward pass takes the
head's RAW (unnormalised) embeddings ``(B, E)`` and int64 class ids ``(B,)``, computes the ``(B, C * k)``
cosine matrix once, reduces it to ``(B, C)`` by the max over each class's sub-centers, turns it into
scaled logits (margins applied to the target column only, except where a formula needs every column)
and returns the mean softmax cross-entropy.

Margins are in RADIANS for the angular losses (arcface family, airface, curricularface, adaface);
cosface's margin is subtracted from the cosine itself.

Build losses by name with :func:`build_loss`; :data:`LOSSES` describes them (defaults, one-line formula).
Formulas and defaults follow ``REFERENCES.md`` ("Loss family").
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    "loss_names",
]

# Floor under 1 - cos^2 before the square root: keeps d sin/d cos finite when cos = ±1 exactly.
_SIN_EPS = 1e-12
# acos is only used where the angle itself is needed; its gradient is infinite at ±1.
_ACOS_CLAMP = 1.0 - 1e-7
_ADAFACE_EPS = 1e-3


# ----------------------------------------------------------------------------------------- validation


def _fail(message: str) -> None:
    raise ValueError(message)


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        _fail(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        _fail(f"{name} must be an integer >= {minimum}, got {value!r}")
    if number < minimum:
        _fail(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def _real(name: str, value: Any, ok, rule: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        _fail(f"{name} must be a number {rule}, got {value!r}")
    if isinstance(value, bool) or not math.isfinite(number) or not ok(number):
        _fail(f"{name} must be {rule}, got {value!r}")
    return number


def _scale(value: Any) -> float:
    return _real("scale", value, lambda v: v > 0, "> 0")


def _margin(name: str, value: Any) -> float:
    return _real(name, value, lambda v: 0 <= v < math.pi, "in [0, pi) (radians)")


def _rate(name: str, value: Any) -> float:
    return _real(name, value, lambda v: 0 <= v <= 1, "in [0, 1]")


# ----------------------------------------------------------------------------------------- helpers


def _gather(matrix: Tensor, column: Tensor) -> Tensor:
    """``matrix[i, column[i]]`` for every row, shape (B,)."""
    return matrix.gather(1, column[:, None]).squeeze(1)


def _set_target(logits: Tensor, column: Tensor, values: Tensor) -> Tensor:
    """Write ``values`` (B,) into each row's target column in place; returns ``logits``."""
    return logits.scatter_(1, column[:, None], values[:, None].to(logits.dtype))


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


@dataclass
class _Batch:
    """What a loss's logit hook sees: one block of rows of the batch (or all of it)."""

    cos: Tensor  # (R, C') float32 cosines, max over sub-centers (raw scores for `softmax`)
    target: Tensor  # (R,) column of each sample's class in `cos`
    labels: Tensor  # (R,) class ids; differs from `target` only under Partial FC
    emb: Tensor  # (R, E) raw float32 embeddings, detached


@dataclass
class _BatchStats:
    """What a loss's running-statistic update sees, once per training forward, before any logit."""

    emb: Tensor  # (B, E) raw float32 embeddings, detached
    target_cos: Tensor  # (B,) cosine of each sample's own class (max over its sub-centers)
    target: Tensor  # (B,) column of each sample's class
    # (rows, (R, C') cosines) blocks of the whole batch; each block is scratch, free to overwrite
    cosines: Callable[[], Iterator[tuple[slice, Tensor]]]


# Rows per block of the fused pass. On a CPU: enough rows for a block of the (rows x C*k) score matrix
# to fill about 1 MB (it stays in cache from its matmul to its gradient), and never fewer than 128,
# because every block also reads and writes the whole (C*k x E) weight gradient (26.7 MB at M4D-35k
# size, where going from 16-row to 128-row blocks took an epoch from 2.2x to 1.5x the matmul floor,
# BENCHMARKS.md). On a GPU: the whole batch up to 2^28 scores (1 GiB in float32), so that a step is
# a handful of kernels.
_BLOCK_ELEMENTS = {"cpu": 1 << 18}
_GPU_BLOCK_ELEMENTS = 1 << 28
_MIN_BLOCK_ROWS = 128


def _block_rows(batch: int, columns: int, device: torch.device) -> int:
    budget = _BLOCK_ELEMENTS.get(device.type, _GPU_BLOCK_ELEMENTS)
    return min(batch, max(_MIN_BLOCK_ROWS, budget // columns))


# ----------------------------------------------------------------------------------------- base


class MarginSoftmaxLoss(nn.Module):
    """Base class: class weights, cosine matrix, sub-center max, Partial FC and cross-entropy.

    A loss says how cosines become logits in one of two ways:

    * most losses only change the target column: others are ``scale·cos θ_c`` (cos clamped to
      ±``others_clamp`` if set). They set ``scale`` and override :meth:`_target_logit`, and train
      through the fast fused pass;
    * the rest override :meth:`_scaled_logits` (every column may change), which the fused pass
      differentiates with autograd one block of rows at a time, unless the loss also gives its
      non-target logits and their derivative elementwise in :meth:`_others_` (and its target in
      :meth:`_target_logit`): then the fused pass runs them with the hand-written softmax.

    Running statistics move in :meth:`_update_state`, once per training forward, before any logit.

    ``forward`` never holds the (B, C·k) score matrix whole: it goes through the batch a block of rows
    at a time, and for each block computes the scores, the loss and at once the gradients with respect
    to the embeddings and the class weights (see ``_FusedMarginCrossEntropy``). ``logits`` and
    ``cosine`` compute the plain full matrices, for inspection and tests.

    Common options:
        sub_centers: weights per class (k); the class cosine is the max over its k sub-centers.
        sample_fraction: Partial FC ratio R in (0, 1]. In training mode with R < 1, each forward uses
            the batch's own classes plus a random ceil(R * rest) of the other classes (drawn from
            torch's global RNG, so seeding makes it reproducible). Eval mode always uses all classes.
        precision: "fp32" or "bf16": dtype of the cosine matmuls; margin arithmetic is always fp32.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    normalise: ClassVar[bool] = True
    others_clamp: ClassVar[float | None] = None

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        sub_centers: int = 1,
        sample_fraction: float = 1.0,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.num_classes = _integer("num_classes", num_classes, 2)
        self.embed_dim = _integer("embed_dim", embed_dim, 1)
        self.sub_centers = _integer("sub_centers", sub_centers, 1)
        self.sample_fraction = _real("sample_fraction", sample_fraction, lambda v: 0 < v <= 1, "in (0, 1]")
        if precision not in ("fp32", "bf16"):
            _fail(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.sub_centers, self.embed_dim))
        # Scratch tensors of the fused pass, kept from step to step: a fresh allocation of tens of MB is
        # mapped afresh by the OS every time, and its page faults alone cost as much as an elementwise pass.
        self._scratch: dict[str, Tensor] = {}
        # Gaussian rows point in uniformly random directions; std 1/sqrt(E) keeps `softmax` logits O(|x|).
        nn.init.normal_(self.weight, std=self.embed_dim**-0.5)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embed_dim={self.embed_dim}, sub_centers={self.sub_centers}, "
            f"sample_fraction={self.sample_fraction}, precision={self.precision!r}"
        )

    def train(self, mode: bool = True) -> "MarginSoftmaxLoss":
        if not mode:
            self._scratch.clear()  # training's scratch tensors are not kept once training is over
        return super().train(mode)

    # --- hooks ------------------------------------------------------------------------------------

    @property
    def target_only(self) -> bool:
        """True when only the target column gets a margin (others are scale·cos): the fast path."""
        return type(self)._scaled_logits is MarginSoftmaxLoss._scaled_logits

    @property
    def elementwise_others(self) -> bool:
        """True when :meth:`_others_` gives the non-target logits for the fused pass (see the class doc)."""
        return type(self)._others_ is not MarginSoftmaxLoss._others_

    @property
    def has_state(self) -> bool:
        """True when running statistics move on training forwards (:meth:`_update_state`)."""
        return type(self)._update_state is not MarginSoftmaxLoss._update_state

    def _target_logit(self, cos_y: Tensor, labels: Tensor, emb: Tensor) -> Tensor:
        """(R,) scaled target logits from the target cosines (differentiable in ``cos_y``); ``emb`` holds
        the rows' raw embeddings (detached), for margins that depend on them."""
        raise NotImplementedError

    def _scaled_logits(self, b: _Batch) -> Tensor:
        """(R, C') float32 logits for cross-entropy. Must not modify ``b.cos`` in place.

        The default: scale·cos θ_c off the target (cos clamped to ±``others_clamp`` when set), the
        target from :meth:`_target_logit`. Losses that keep it run the hand-written fused softmax.
        """
        cos = b.cos if self.others_clamp is None else b.cos.clamp(-self.others_clamp, self.others_clamp)
        target = self._target_logit(_gather(b.cos, b.target), b.labels, b.emb)
        return _set_target(cos * self.scale, b.target, target)

    def _others_(self, cos: Tensor, cos_y: Tensor, deriv: Tensor) -> None:
        """In place, a block's cosines ``cos`` (R, C') -> its logits, and ``deriv`` (R, C') <- d logit / d cos,
        given each row's target cosine ``cos_y`` (R,). The target column's entries are ignored. Must agree
        with :meth:`_scaled_logits` off the target, which the tests hold it to."""
        raise NotImplementedError

    def _update_state(self, s: _BatchStats) -> None:
        """Move running statistics (without gradient); called on training forwards only."""

    # --- public -----------------------------------------------------------------------------------

    def cosine(self, embeddings: Tensor) -> Tensor:
        """(B, C) cosine to every class (max over its sub-centers); argmax is the predicted class.

        For ``softmax`` these are the raw class scores ``x · W_c`` instead, since that is what its
        classifier ranks by.
        """
        emb = self._check_embeddings(embeddings)
        with torch.no_grad():
            return self._class_scores(emb, None)

    def logits_with_classes(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scaled logits (B, C'), each sample's target column (B,), and the class id of each column (C',),
        as one full matrix (differentiable). C' = C except under Partial FC (training mode,
        sample_fraction < 1). Never updates running statistics: only ``forward`` does.
        """
        emb, labels = self._check_inputs(embeddings, labels)
        classes, target = self._sample_classes(labels)
        cos = self._class_scores(emb, classes)
        logits = self._scaled_logits(_Batch(cos, target, labels, emb.detach()))
        if classes is None:
            classes = torch.arange(self.num_classes, device=logits.device)
        return logits, target, classes

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(B, C') float32 scaled logits with margins applied to the targets (see logits_with_classes)."""
        return self.logits_with_classes(embeddings, labels)[0]

    def forward_with_hits(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy loss and, per sample (B,), whether its own class has the highest cosine of
        the classes this step scored: train accuracy at no extra cost. Under Partial FC that is among the
        sampled classes (the usual convention), not a second matmul over all of them.

        In training mode, running statistics are updated (without gradient) before the logits are formed.
        """
        emb, labels = self._check_inputs(embeddings, labels)
        classes, target = self._sample_classes(labels)
        weight = self.weight if classes is None else self.weight.index_select(0, self._weight_rows(classes))
        return _FusedMarginCrossEntropy.apply(emb, weight, _Step(self, target, labels))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar mean softmax cross-entropy over the scaled logits."""
        return self.forward_with_hits(embeddings, labels)[0]

    # --- internals --------------------------------------------------------------------------------

    def _check_embeddings(self, embeddings: Tensor) -> Tensor:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            _fail(f"embeddings must have shape (B, {self.embed_dim}), got {tuple(embeddings.shape)}")
        return embeddings.float()

    def _check_inputs(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        emb = self._check_embeddings(embeddings)
        if labels.shape != (emb.shape[0],):
            _fail(f"labels must have shape ({emb.shape[0]},), got {tuple(labels.shape)}")
        return emb, labels.to(device=emb.device, dtype=torch.long)

    def _workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A reusable scratch tensor of ``shape`` (contents undefined), grown when a step needs more."""
        numel = math.prod(shape)
        buf = self._scratch.pop(name, None)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            del buf  # freed before the larger one is allocated
            buf = torch.empty(numel, dtype=dtype, device=device)
        self._scratch[name] = buf
        return buf[:numel].view(shape)

    def _weight_rows(self, classes: Tensor) -> Tensor:
        k = self.sub_centers
        return (classes[:, None] * k + torch.arange(k, device=classes.device)).flatten()

    def _sample_classes(self, labels: Tensor) -> tuple[Tensor | None, Tensor]:
        """Partial FC: (sorted class ids in play, labels remapped to columns), or (None, labels)."""
        if not self.training or self.sample_fraction >= 1.0:
            return None, labels
        n, device = self.num_classes, labels.device
        present = torch.zeros(n, dtype=torch.bool, device=device)
        present[labels] = True
        n_present = int(present.sum())
        n_other = math.ceil(self.sample_fraction * (n - n_present))
        # Random keys in [0, 1); the batch's classes get 2 so top-k always keeps them.
        keys = torch.rand(n, device=device).masked_fill_(present, 2.0)
        classes = keys.topk(n_present + n_other, sorted=False).indices.sort().values
        column = torch.full((n,), -1, dtype=torch.long, device=device)
        column[classes] = torch.arange(classes.numel(), device=device)
        return classes, column[labels]

    def _class_scores(self, emb: Tensor, classes: Tensor | None) -> Tensor:
        """(B, C') cosines (max over sub-centers) against all classes or the given subset, one matrix."""
        k = self.sub_centers
        weight = self.weight if classes is None else self.weight.index_select(0, self._weight_rows(classes))
        if self.normalise:
            emb = F.normalize(emb, dim=1)
            weight = F.normalize(weight, dim=1)
        # Autocast off: the precision option alone decides the matmul dtype.
        with torch.autocast(device_type=emb.device.type, enabled=False):
            if self.precision == "bf16":
                scores = F.linear(emb.bfloat16(), weight.bfloat16())
            else:
                scores = F.linear(emb, weight.float())
        if k > 1:
            scores = scores.view(scores.shape[0], -1, k).max(dim=2).values
        return scores.float()


@dataclass
class _Step:
    """The non-tensor inputs of one fused forward."""

    loss: MarginSoftmaxLoss
    target: Tensor  # (B,) columns
    labels: Tensor  # (B,) class ids


_NORM_EPS = 1e-12  # as F.normalize


def _normalise_rows(x: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(x / max(‖x‖, eps) row-wise, the clamped norms (..., 1)); ``out`` may be a differently laid out view."""
    norms = x.norm(dim=-1, keepdim=True).clamp_min_(_NORM_EPS)
    return torch.div(x, norms, out=out) if out is not None else x / norms, norms


def _normalise_rows_backward_(grad: Tensor, unit: Tensor, norms: Tensor, block: int = 8192) -> Tensor:
    """In place, d loss / d x from d loss / d (x / ‖x‖): (g − u·(u·g)) / ‖x‖, or g / eps where the norm
    was clamped. A block of rows at a time, so that no temporary is the size of the class weights."""
    for lo in range(0, grad.shape[0], block):
        g, u, r = grad[lo:lo + block], unit[lo:lo + block], norms[lo:lo + block]
        along = (u * g).sum(dim=-1, keepdim=True).masked_fill_(r <= _NORM_EPS, 0.0)
        g.addcmul_(u, along, value=-1.0).div_(r)
    return grad


class _FusedMarginCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of a margin loss, with its gradients computed in the same pass.

    Inputs: the raw embeddings (B, E) and the raw class weights (C'·k, E), row c·k + j for sub-center j
    of column c. Both are normalised here (not for ``softmax``), the weights into sub-center-major order
    (row j·C' + c), so that the max over sub-centers is k − 1 elementwise maxima. The batch is then
    scored a block of rows at a time: block scores (R, k·C') -> max over sub-centers -> logits ->
    cross-entropy -> d loss / d scores, routed to the sub-center that gave each max (the first one on a
    tie, as torch.max) -> the block's share of d loss / d embeddings and d loss / d weights. The only
    matmuls are the three that any backward pass needs; on a CPU a block stays in cache from its matmul
    to its gradient, and its buffers are reused from block to block. The gradients wait in ``ctx``
    until backward scales them by the incoming one (so backward can run only once per forward).
    """

    @staticmethod
    def forward(ctx, emb: Tensor, weight: Tensor, step: _Step) -> tuple[Tensor, Tensor]:
        loss, target, n, k = step.loss, step.target, emb.shape[0], step.loss.sub_centers
        n_cols, dim = weight.shape[0] // k, weight.shape[1]
        fast = loss.target_only
        # Hand-written softmax: the fast path, or elementwise non-target logits (scale not folded then).
        hand = fast or loss.elementwise_others
        mm_dtype = torch.bfloat16 if loss.precision == "bf16" else torch.float32
        rows = _block_rows(n, k * n_cols, emb.device)
        by_class = weight.view(n_cols, k, dim)  # [c, j] = sub-center j of column c
        unit_w = torch.empty(k, n_cols, dim, dtype=weight.dtype, device=weight.device)  # [j, c], normalised
        if loss.normalise:
            unit_emb, emb_norms = _normalise_rows(emb)
            _, w_norms = _normalise_rows(by_class, out=unit_w.transpose(0, 1))
        else:
            unit_emb = emb
            unit_w.copy_(by_class.transpose(0, 1))
        with torch.autocast(device_type=emb.device.type, enabled=False):
            w_mm = unit_w.view(k * n_cols, dim).to(mm_dtype)
            scores_buf = loss._workspace("scores", (rows, k * n_cols), mm_dtype, emb.device)
            logits_buf = loss._workspace("logits", (rows, n_cols), torch.float32, emb.device) \
                if mm_dtype != torch.float32 else None

            def block_scores(emb_mm: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
                """(R, k·C') scores of rows lo:hi and their (R, C') max over sub-centers (reused buffers)."""
                scores = torch.mm(emb_mm[lo:hi], w_mm.t(), out=scores_buf[: hi - lo])
                if k == 1:
                    return scores, scores
                by_center = scores.view(hi - lo, k, n_cols)
                best = loss._workspace("best", (hi - lo, n_cols), mm_dtype, emb.device)
                torch.maximum(by_center[:, 0], by_center[:, 1], out=best)
                for j in range(2, k):
                    torch.maximum(best, by_center[:, j], out=best)
                return scores, best

            update_state = loss.training and loss.has_state
            if hand or update_state:
                # Each sample's own class cosine, straight from its k sub-centers (float32, B·k·E work).
                target_cos = (unit_w[:, target] * unit_emb).sum(dim=2).amax(dim=0)
            if update_state:
                unit_mm = unit_emb.to(mm_dtype)

                def cosines() -> Iterator[tuple[slice, Tensor]]:
                    for lo in range(0, n, rows):
                        yield slice(lo, lo + rows), block_scores(unit_mm, lo, min(n, lo + rows))[1].float()

                loss._update_state(_BatchStats(emb, target_cos, target, cosines))
            # Fast path: the scale (read after the update: adacos moves it) is folded into the embeddings,
            # so the matmul yields the logits.
            scale = float(loss.scale) if fast else 1.0
            emb_mm = (unit_emb * scale if fast else unit_emb).to(mm_dtype)
            if hand:  # the target logits and their slopes, once for the whole batch
                with torch.enable_grad():
                    cos_y = target_cos.clone().requires_grad_()
                    target_logit = loss._target_logit(cos_y, step.labels, emb).float()
                    (slope,) = torch.autograd.grad(target_logit.sum(), cos_y)
                target_logit = target_logit.detach()
                limit = None if loss.others_clamp is None else scale * loss.others_clamp

            grad_emb = torch.empty(n, dim, dtype=mm_dtype, device=emb.device)
            # d loss / d unit weights, in the weights' own layout: [c, j] = sub-center j of column c. The
            # first block writes it (no separate zeroing pass), later ones add to it.
            grad_weight = torch.empty(n_cols, k, dim, dtype=torch.float32, device=emb.device)
            rows_out = _RowStats.empty(n, emb.device)
            for lo in range(0, n, rows):
                hi = min(n, lo + rows)
                scores, best = block_scores(emb_mm, lo, hi)
                if k > 1:
                    by_center = scores.view(hi - lo, k, n_cols)
                    _first_max_masks_(by_center, best)
                logits = best if logits_buf is None else logits_buf[: hi - lo].copy_(best)
                if hand:
                    row_factor = _fast_block(logits, target[lo:hi], target_logit[lo:hi], slope[lo:hi] / scale,
                                             rows_out.view(lo, hi), n, limit,
                                             None if fast else (loss, target_cos[lo:hi]))
                else:
                    block = _Batch(logits, target[lo:hi], step.labels[lo:hi], emb[lo:hi])
                    _autograd_block(loss, block, rows_out.view(lo, hi), n)
                    row_factor = None
                # `logits` now holds d loss / d logits, up to a factor per row (applied to the two (R, E)
                # matmul operands below rather than to the (R, C') matrix): route it to the sub-centers.
                if k > 1:
                    for j in range(k):
                        by_center[:, j].mul_(logits)
                    grad_scores = scores
                else:
                    grad_scores = logits.to(mm_dtype)
                block_emb = emb_mm[lo:hi]
                if row_factor is not None:
                    row_factor = row_factor.to(mm_dtype)[:, None]
                    block_emb = block_emb * row_factor
                torch.mm(grad_scores, w_mm, out=grad_emb[lo:hi])
                if row_factor is not None:
                    grad_emb[lo:hi] *= row_factor
                for j in range(k):  # sub-center j's (C', E) gradient, a strided view of grad_weight
                    grad_j, scores_j = grad_weight[:, j], grad_scores[:, j * n_cols:(j + 1) * n_cols]
                    if mm_dtype == torch.float32:
                        torch.addmm(grad_j, scores_j.t(), block_emb, beta=float(lo > 0), out=grad_j)
                    elif lo == 0:
                        grad_j.copy_(scores_j.t() @ block_emb)
                    else:
                        grad_j += (scores_j.t() @ block_emb).float()
        if hand:  # the per-row figures the blocks left behind, for the whole batch at once
            value, hits = rows_out.fast_loss(scale * target_cos, target_logit)
        else:
            value, hits = rows_out.row_loss.sum(), rows_out.hits
        del scores_buf, logits_buf
        # Back through the normalisations, into the inputs' own layouts.
        grad_emb = grad_emb.float()
        if fast:
            grad_emb.mul_(scale)
        if loss.normalise:
            _normalise_rows_backward_(grad_emb, unit_emb, emb_norms)
            _normalise_rows_backward_(grad_weight, unit_w.transpose(0, 1), w_norms)
        ctx.grads = (grad_emb, grad_weight.view(k * n_cols, dim))
        ctx.mark_non_differentiable(hits)
        return value / n, hits

    @staticmethod
    def backward(ctx, grad_value: Tensor, _grad_hits: Tensor) -> tuple[Tensor, Tensor, None]:
        if ctx.grads is None:
            raise RuntimeError("the fused margin loss can be differentiated once per forward (no retain_graph)")
        grad_emb, grad_weight = ctx.grads
        ctx.grads = None
        return grad_emb.mul_(grad_value), grad_weight.mul_(grad_value), None


def _first_max_masks_(by_center: Tensor, best: Tensor) -> None:
    """In place, scores (R, k, C) -> one-hot masks (1.0 / 0.0) of the first sub-center whose score
    equals ``best`` (R, C), their max: the one torch.max picks on a tie, and the one that gets the gradient.

    The max is attained somewhere, so the last sub-center's mask is "no earlier one claimed it" and its
    scores are never read: with k = 3 that is four passes over (R, C) and no temporary.
    """
    k = by_center.shape[1]
    first, last = by_center[:, 0].eq_(best), by_center[:, k - 1]
    if k == 2:
        torch.eq(first, 0.0, out=last)
        return
    second = torch.gt(by_center[:, 1].eq_(best), first, out=by_center[:, 1])  # a tie stays with the first
    if k == 3:
        torch.eq(first, second, out=last)  # both 0
        return
    claimed = torch.add(first, second, out=last)
    for j in range(2, k - 1):
        claimed.add_(torch.gt(by_center[:, j].eq_(best), claimed, out=by_center[:, j]))
    claimed.eq_(0.0)


@dataclass
class _RowStats:
    """Per-row figures of the fused pass, filled a block at a time (float32, (B,) each)."""

    other_max: Tensor  # max logit over the non-target columns
    others: Tensor  # sum of exp(logit - shift) over the non-target columns
    shift: Tensor  # the row max, target included
    row_loss: Tensor  # autograd path: each row's loss
    hits: Tensor  # autograd path: own class scored highest (bool)

    @classmethod
    def empty(cls, n: int, device: torch.device) -> "_RowStats":
        floats = [torch.empty(n, device=device) for _ in range(4)]
        return cls(*floats, hits=torch.empty(n, dtype=torch.bool, device=device))

    def view(self, lo: int, hi: int) -> "_RowStats":
        """The rows lo:hi, sharing storage."""
        return _RowStats(*(getattr(self, f.name)[lo:hi] for f in fields(self)))

    def fast_loss(self, logit_y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Summed loss and top-1 hits, from each row's own scale·cos ``logit_y`` and target logit ``t``.

        The loss of a row, log(others·e^shift + e^t) − t, is written softplus(log(others) + shift − t):
        exact when the target dominates (a loss of 1e-20 is not rounded to 0) and never overflowing.
        """
        row_loss = F.softplus(self.others.log() + (self.shift - t))
        return row_loss.sum(), logit_y >= self.other_max


def _fast_block(logits: Tensor, target: Tensor, t: Tensor, slope: Tensor, out: _RowStats, batch: int,
                limit: float | None = None, others: tuple[MarginSoftmaxLoss, Tensor] | None = None) -> Tensor:
    """Cross-entropy gradient of a block of rows whose non-target logits are ``logits`` (scale·cos),
    clamped to ±``limit`` if given; ``t`` (R,) is each row's target logit after its margin and ``slope``
    d t / d (scale·cos_y). With ``others`` = (loss, the rows' target cosines), ``logits`` holds
    cosines, which the loss's :meth:`MarginSoftmaxLoss._others_` turns into its logits.

    Overwrites ``logits`` with d mean loss / d logits divided by a factor per row, which it returns;
    fills ``out`` with what the loss needs.
    """
    column = target[:, None]
    # A clamp changes nothing unless a score is past the limit (cos within 1e-3 of ±1 for adaface): one
    # pass to find out, and the masks only then.
    beyond = None
    if limit is not None:
        low, high = torch.aminmax(logits)
        if low < -limit or high > limit:
            beyond = logits.abs() > limit  # where the clamp's gradient is 0
    logits.scatter_(1, column, -math.inf)
    torch.amax(logits, dim=1, out=out.other_max)  # unclamped, as the hits are judged on the cosines
    if beyond is not None:
        logits.clamp_(-limit, limit).scatter_(1, column, -math.inf)
    deriv = None
    if others is not None:  # other_max stays a cosine, what the hits are judged on
        loss, cos_y = others
        deriv = loss._workspace("deriv", tuple(logits.shape), logits.dtype, logits.device)
        loss._others_(logits.scatter_(1, column, 0.0), cos_y, deriv)
        shift_base = logits.scatter_(1, column, -math.inf).amax(dim=1)
    else:
        shift_base = out.other_max
    # Shifted by the row max, so exp never overflows. The target column holds -inf: its exp is 0, and
    # `others`, the non-target share, is summed on its own, which keeps the loss and the target's gradient
    # exact when the target dominates.
    torch.maximum(shift_base, t, out=out.shift)
    probs = logits.sub_(out.shift[:, None]).exp_()
    torch.sum(probs, dim=1, out=out.others)
    if beyond is not None:
        probs.masked_fill_(beyond, 0.0)
    if deriv is not None:
        probs.mul_(deriv)
    sum_exp = out.others + torch.exp(t - out.shift)
    # d mean loss / d logit is softmax / B = probs / (B·sum_exp) off the target, and (p_y - 1)/B times the
    # margin's slope = -others / (B·sum_exp) · slope on it: both are left as multiples of 1 / (B·sum_exp).
    probs.scatter_(1, column, (out.others * -slope)[:, None])
    return (sum_exp * batch).reciprocal_()


def _autograd_block(loss: MarginSoftmaxLoss, b: _Batch, out: _RowStats, batch: int) -> None:
    """Cross-entropy of a block of rows through the loss's own ``_scaled_logits``, by autograd.

    ``b.cos`` holds the block's cosines on entry and d mean loss / d cosines on return; fills ``out``'s
    row losses and hits.
    """
    torch.eq(b.cos.argmax(dim=1), b.target, out=out.hits)
    with torch.enable_grad():
        cos = b.cos.clone().requires_grad_()
        scaled = loss._scaled_logits(_Batch(cos, b.target, b.labels, b.emb))
        row_loss = F.cross_entropy(scaled, b.target, reduction="none")
        (grad,) = torch.autograd.grad(row_loss.sum(), cos, torch.tensor(1.0 / batch, device=cos.device))
    out.row_loss.copy_(row_loss.detach())
    b.cos.copy_(grad)


# ----------------------------------------------------------------------------------------- losses


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
        self.scale = _scale(scale)

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
        self.scale = _scale(scale)
        self.margin = _margin("margin", margin)

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
        self.scale = _scale(scale)
        self.margin = _margin("margin", margin)

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
        margin_min = _margin("margin_min", margin_min)
        margin_max = _margin("margin_max", margin_max)
        if margin_min > margin_max:
            _fail(f"margin_min must be <= margin_max, got {margin_min} > {margin_max}")
        super().__init__(num_classes, embed_dim, scale=scale, margin=margin_max, **common)
        self.margin_min, self.margin_max = margin_min, margin_max
        self.register_buffer("margins", self._margins_from_counts(class_counts).float())

    def _margins_from_counts(self, class_counts: Any) -> Tensor:
        try:
            counts = torch.as_tensor(class_counts, dtype=torch.float64).cpu()
        except (TypeError, ValueError, RuntimeError):
            _fail(f"class_counts must be a 1-D sequence of numbers, got {type(class_counts).__name__}")
        if counts.ndim != 1 or counts.numel() != self.num_classes:
            _fail(
                f"class_counts must be 1-D with one count per class id (length {self.num_classes}), "
                f"got shape {tuple(counts.shape)}"
            )
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            _fail("class_counts must be finite and >= 0")
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
        self.scale = _scale(scale)
        self.margin = _margin("margin", margin)

    def _scaled_logits(self, b: _Batch) -> Tensor:
        theta = torch.acos(b.cos.clamp(-_ACOS_CLAMP, _ACOS_CLAMP))
        slope = 2.0 * self.scale / math.pi  # s(π − 2θ)/π = s − slope·θ
        logits = theta.mul(-slope).add_(self.scale)
        target = self.scale - slope * (_gather(theta, b.target) + self.margin)
        return _set_target(logits, b.target, target)

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
        self.scale = _scale(scale)
        self.margin = _margin("margin", margin)
        self.momentum = _rate("momentum", momentum)
        self.register_buffer("t", torch.zeros(()))

    def _update_state(self, s: _BatchStats) -> None:
        self.t.lerp_(s.target_cos.mean(), self.momentum)

    def _scaled_logits(self, b: _Batch) -> Tensor:
        cos_y = _gather(b.cos, b.target)
        # Hardness is judged against cos(θ_y + m) itself, not the fallback value (as upstream).
        hard = b.cos > _cos_plus(cos_y, self.margin).detach()[:, None]
        logits = torch.where(hard, b.cos * (b.cos + self.t), b.cos).mul_(self.scale)
        return _set_target(logits, b.target, _arc_target(cos_y, self.margin) * self.scale)

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
        self.scale = _scale(scale)
        self.margin = _margin("margin", margin)
        self.h = _real("h", h, lambda v: v >= 0, ">= 0")
        self.momentum = _rate("momentum", momentum)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    @staticmethod
    def _norms(emb: Tensor) -> Tensor:
        return emb.detach().norm(dim=1).clamp(_ADAFACE_EPS, 100.0)

    def _update_state(self, s: _BatchStats) -> None:
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
            _fail(f"adacos needs at least 3 classes (its starting scale sqrt(2)·ln(C - 1) is 0 for C = 2), got {num_classes}")
        super().__init__(num_classes, embed_dim, **common)
        self.register_buffer("scale", torch.tensor(math.sqrt(2.0) * math.log(self.num_classes - 1)))

    def _update_state(self, s: _BatchStats) -> None:
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


# ----------------------------------------------------------------------------------------- registry


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
        SoftmaxLoss,
        NormFaceLoss,
        CosFaceLoss,
        ArcFaceLoss,
        SubCenterArcFaceLoss,
        DynamicArcFaceLoss,
        AirFaceLoss,
        CurricularFaceLoss,
        AdaFaceLoss,
        AdaCosLoss,
    )
}


def loss_names() -> list[str]:
    """Registered loss names, in table order."""
    return list(LOSSES)


def canonical_name(name: str) -> str:
    """The registry's name for ``name`` (case and ``_``/``-`` do not matter); ValueError listing the valid names."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in LOSSES:
        _fail(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
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
        _fail(f"unknown option(s) {', '.join(unknown)} for loss {key!r}; valid options: {', '.join(spec.defaults)}")
    missing = [k for k, v in spec.defaults.items() if v is None and k not in hparams]
    if missing:
        _fail(f"loss {key!r} requires {', '.join(missing)}")
    return spec.cls(num_classes, embed_dim, **hparams)

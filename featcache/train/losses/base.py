"""What a margin loss is: class weights, the hooks that turn cosines into logits, Partial FC, and the
fused cross-entropy that trains it (``fused``). The losses themselves are in ``formulas``.

Every loss owns its class weights ``weight`` of shape ``(num_classes * k, embed_dim)``; row ``c * k + j``
is sub-center ``j`` of class ``c`` (k = 1 except for ``subcenter-arcface``). A forward pass takes the
head's RAW (unnormalised) embeddings ``(B, E)`` and int64 class ids ``(B,)``, computes the ``(B, C * k)``
cosines, reduces them to ``(B, C)`` by the max over each class's sub-centers, turns them into scaled
logits (margins applied to the target column only, except where a formula needs every column) and
returns the mean softmax cross-entropy.
"""

from __future__ import annotations

import math
import operator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featcache.train.losses.fused import Batch, BatchStats, FusedMarginCrossEntropy, Step

# ----------------------------------------------------------------------------------------- validation


def fail(message: str) -> None:
    raise ValueError(message)


def as_integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        fail(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        fail(f"{name} must be an integer >= {minimum}, got {value!r}")
    if number < minimum:
        fail(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def as_real(name: str, value: Any, ok, rule: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        fail(f"{name} must be a number {rule}, got {value!r}")
    if isinstance(value, bool) or not math.isfinite(number) or not ok(number):
        fail(f"{name} must be {rule}, got {value!r}")
    return number


def as_scale(value: Any) -> float:
    return as_real("scale", value, lambda v: v > 0, "> 0")


def as_margin(name: str, value: Any) -> float:
    return as_real(name, value, lambda v: 0 <= v < math.pi, "in [0, pi) (radians)")


def as_rate(name: str, value: Any) -> float:
    return as_real(name, value, lambda v: 0 <= v <= 1, "in [0, 1]")


# ----------------------------------------------------------------------------------------- helpers


def gather_target(matrix: Tensor, column: Tensor) -> Tensor:
    """``matrix[i, column[i]]`` for every row, shape (B,)."""
    return matrix.gather(1, column[:, None]).squeeze(1)


def set_target(logits: Tensor, column: Tensor, values: Tensor) -> Tensor:
    """Write ``values`` (B,) into each row's target column in place; returns ``logits``."""
    return logits.scatter_(1, column[:, None], values[:, None].to(logits.dtype))


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
    to the embeddings and the class weights (see ``FusedMarginCrossEntropy``). ``logits`` and
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
        self.num_classes = as_integer("num_classes", num_classes, 2)
        self.embed_dim = as_integer("embed_dim", embed_dim, 1)
        self.sub_centers = as_integer("sub_centers", sub_centers, 1)
        self.sample_fraction = as_real("sample_fraction", sample_fraction, lambda v: 0 < v <= 1, "in (0, 1]")
        if precision not in ("fp32", "bf16"):
            fail(f"precision must be 'fp32' or 'bf16', got {precision!r}")
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

    def _scaled_logits(self, b: Batch) -> Tensor:
        """(R, C') float32 logits for cross-entropy. Must not modify ``b.cos`` in place.

        The default: scale·cos θ_c off the target (cos clamped to ±``others_clamp`` when set), the
        target from :meth:`_target_logit`. Losses that keep it run the hand-written fused softmax.
        """
        cos = b.cos if self.others_clamp is None else b.cos.clamp(-self.others_clamp, self.others_clamp)
        target = self._target_logit(gather_target(b.cos, b.target), b.labels, b.emb)
        return set_target(cos * self.scale, b.target, target)

    def _others_(self, cos: Tensor, cos_y: Tensor, deriv: Tensor) -> None:
        """In place, a block's cosines ``cos`` (R, C') -> its logits, and ``deriv`` (R, C') <- d logit / d cos,
        given each row's target cosine ``cos_y`` (R,). The target column's entries are ignored. Must agree
        with :meth:`_scaled_logits` off the target, which the tests hold it to."""
        raise NotImplementedError

    def _update_state(self, s: BatchStats) -> None:
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
        logits = self._scaled_logits(Batch(cos, target, labels, emb.detach()))
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
        return FusedMarginCrossEntropy.apply(emb, weight, Step(self, target, labels))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar mean softmax cross-entropy over the scaled logits."""
        return self.forward_with_hits(embeddings, labels)[0]

    # --- internals --------------------------------------------------------------------------------

    def _check_embeddings(self, embeddings: Tensor) -> Tensor:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            fail(f"embeddings must have shape (B, {self.embed_dim}), got {tuple(embeddings.shape)}")
        return embeddings.float()

    def _check_inputs(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        emb = self._check_embeddings(embeddings)
        if labels.shape != (emb.shape[0],):
            fail(f"labels must have shape ({emb.shape[0]},), got {tuple(labels.shape)}")
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

"""The fused margin cross-entropy: a loss's scores, loss and gradients in one block-wise pass.

The engine knows no particular loss. It reads what it needs from the loss through the hooks of
:class:`LossHooks` (the base class ``MarginSoftmaxLoss`` implements them) and never holds the
(B, C·k) score matrix whole: it scores the batch a block of rows at a time and, for each block,
computes the loss and at once the gradients with respect to the embeddings and the class weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Batch:
    """What a loss's logit hook sees: one block of rows of the batch (or all of it)."""

    cos: Tensor  # (R, C') float32 cosines, max over sub-centers (raw scores for `softmax`)
    target: Tensor  # (R,) column of each sample's class in `cos`
    labels: Tensor  # (R,) class ids; differs from `target` only under Partial FC
    emb: Tensor  # (R, E) raw float32 embeddings, detached


@dataclass
class BatchStats:
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


class LossHooks(Protocol):
    """What the engine asks of a loss (see ``MarginSoftmaxLoss`` for their meaning)."""

    training: bool
    normalise: bool
    sub_centers: int
    precision: str
    scale: float | Tensor
    others_clamp: float | None
    target_only: bool
    elementwise_others: bool
    has_state: bool

    def _target_logit(self, cos_y: Tensor, labels: Tensor, emb: Tensor) -> Tensor: ...

    def _scaled_logits(self, b: "Batch") -> Tensor: ...

    def _others_(self, cos: Tensor, cos_y: Tensor, deriv: Tensor) -> None: ...

    def _update_state(self, s: "BatchStats") -> None: ...

    def _workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor: ...


@dataclass
class Step:
    """The non-tensor inputs of one fused forward."""

    loss: LossHooks
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


class FusedMarginCrossEntropy(torch.autograd.Function):
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
    def forward(ctx, emb: Tensor, weight: Tensor, step: Step) -> tuple[Tensor, Tensor]:
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

                loss._update_state(BatchStats(emb, target_cos, target, cosines))
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
                    block = Batch(logits, target[lo:hi], step.labels[lo:hi], emb[lo:hi])
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
                limit: float | None = None, others: tuple[LossHooks, Tensor] | None = None) -> Tensor:
    """Cross-entropy gradient of a block of rows whose non-target logits are ``logits`` (scale·cos),
    clamped to ±``limit`` if given; ``t`` (R,) is each row's target logit after its margin and ``slope``
    d t / d (scale·cos_y). With ``others`` = (loss, the rows' target cosines), ``logits`` holds
    cosines, which the loss's ``_others_`` turns into its logits.

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


def _autograd_block(loss: LossHooks, b: Batch, out: _RowStats, batch: int) -> None:
    """Cross-entropy of a block of rows through the loss's own ``_scaled_logits``, by autograd.

    ``b.cos`` holds the block's cosines on entry and d mean loss / d cosines on return; fills ``out``'s
    row losses and hits.
    """
    torch.eq(b.cos.argmax(dim=1), b.target, out=out.hits)
    with torch.enable_grad():
        cos = b.cos.clone().requires_grad_()
        scaled = loss._scaled_logits(Batch(cos, b.target, b.labels, b.emb))
        row_loss = F.cross_entropy(scaled, b.target, reduction="none")
        (grad,) = torch.autograd.grad(row_loss.sum(), cos, torch.tensor(1.0 / batch, device=cos.device))
    out.row_loss.copy_(row_loss.detach())
    b.cos.copy_(grad)

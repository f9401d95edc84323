"""Stage two: train a projection head and its margin loss from a feature cache.

The features are read from the cache once, into memory (RAM or GPU, in the cache's dtype) and cast
per batch (with ``views``, each row's clean and augmented views, one of them drawn per row and epoch);
the loop below is the whole training procedure: Adam with coupled weight decay, linear
warm-up then cosine decay per iteration, the paper's defaults throughout. It decides what becomes of a
run directory (start, resume, overwrite); ``runs`` reads and writes its files.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from featcache import __version__
from featcache.cache import CacheError, FeatureCache, feature_space
from featcache.files import exclusive
from featcache.storage import absolute, location, named_as, working_copy
from featcache.train.heads import ProjectionHead
from featcache.train.losses import LOSSES, build_loss, canonical_name
from featcache.train.options import OPTIMIZERS, WARMUPS, TrainOptions  # noqa: F401  (re-exported)
from featcache.train.runs import (
    CONFIG, STATE, WRITE_ORDER, RunError, load_state, read_config, read_metrics, remove_run_files, remove_state, save_state, save_weights,
    start_run, write_config, write_metrics,
)

@dataclass
class TrainData:
    """The training rows of a cache, in memory: split == train and valid."""

    features: torch.Tensor  # (N, D), the cache's dtype: the clean (eval) view
    labels: torch.Tensor  # (N,) int64, contiguous over the training classes
    classes: list[str]  # training class names, indexed by label
    cache_path: Path
    cache_key: str
    backbone: str
    skipped_invalid: int
    feature_space: dict[str, Any] = field(default_factory=dict)  # backbone + preprocessing: what the head fits
    views: torch.Tensor | None = None  # (N, 1 + V, D): the clean view, then the V augmented ones; features = views[:, 0]
    augmentation: dict[str, Any] | None = None  # how the cache's views were made

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels.cpu().numpy(), minlength=self.num_classes)


def load_train_data(cache_path: str | Path, device: str = "cpu", views: bool = False) -> TrainData:
    """Read the cache's training rows once (with ``views``, their augmented views too); refuse data that
    cannot train a head, with one line."""
    cache = FeatureCache.open(cache_path)
    cache.require_complete()
    if views and not cache.views:
        raise CacheError(f"{cache.path}: --views needs a cache with augmented views; extract one with "
                         "`featcache extract ... --views V --augment NAME`")
    splits = cache.strings("splits")
    valid = cache.valid()
    train = splits == "train"
    rows = train & valid
    if not rows.any():
        raise CacheError(f"{cache.path}: no valid training rows (split == train): nothing to train on")
    if views:  # read straight into one (N, 1 + V, D) array: memory holds it and one block, no more
        feats = np.empty((int(rows.sum()), 1 + cache.views, cache.dim), dtype=cache.meta["dtype"])
        cache.features(rows, out=feats[:, 0])
        cache.augmented(rows, out=feats[:, 1:])
    else:
        feats = cache.features(rows)
    bad = _non_finite_rows(feats)
    if bad:
        raise CacheError(f"{cache.path}: {bad} training rows have NaN or infinite features; re-extract with --dtype float32 or drop them")
    labels = cache.labels()[rows]
    classes, contiguous = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise CacheError(f"{cache.path}: the training rows hold a single class; a classification loss needs at least 2")
    names = cache.classes()[classes]
    stored = torch.from_numpy(np.ascontiguousarray(feats)).to(device)
    return TrainData(
        features=stored[:, 0] if views else stored,
        views=stored if views else None,
        augmentation=cache.augmentation if views else None,
        labels=torch.from_numpy(contiguous.astype(np.int64)).to(device),
        classes=[str(c) for c in names],
        cache_path=cache.path,
        cache_key=cache.key,
        backbone=cache.meta["backbone"]["name"],
        skipped_invalid=int((train & ~valid).sum()),
        feature_space=feature_space(cache.meta),
    )


def _non_finite_rows(feats: np.ndarray, block: int = 1 << 16) -> int:
    """Rows of an (N, D) or (N, 1 + V, D) array with a value that is not finite."""
    axes = tuple(range(1, feats.ndim))
    return int(sum((~np.isfinite(feats[i:i + block])).any(axis=axes).sum() for i in range(0, len(feats), block)))


def view_draw(data: TrainData, seed: int, epoch: int) -> torch.Tensor:
    """Per row, which of its 1 + V views (0 = clean) trains in ``epoch``: uniform, seeded by (seed, epoch)
    alone, so a resumed run draws what an uninterrupted one did."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randint(0, data.views.shape[1], (len(data.labels),), generator=g).to(data.views.device)


def batch_features(data: TrainData, idx: torch.Tensor, draw: torch.Tensor | None) -> torch.Tensor:
    """The rows ``idx`` as float32 (B, D): their clean features, or with ``draw`` the view drawn for each."""
    # index_select, not features[idx]: several times faster on a CPU
    if draw is None:
        return data.features.index_select(0, idx).float()
    per_row = data.views.shape[1]
    flat = data.views.view(-1, data.views.shape[2])
    return flat.index_select(0, idx * per_row + draw.index_select(0, idx)).float()


def loss_hparams(options: TrainOptions, data: TrainData) -> dict[str, Any]:
    """The options handed to ``build_loss``: the user's, plus Partial FC, precision and class counts."""
    hp = {k: v for k, v in options.loss_opts.items() if v is not None}
    hp["sample_fraction"] = options.sample_classes
    hp["precision"] = options.precision
    if "class_counts" in LOSSES[canonical_name(options.loss)].defaults:
        hp["class_counts"] = data.class_counts()
    return hp


def check_options(options: TrainOptions, data: TrainData) -> None:
    """The loss's options, checked without allocating anything (the loss is built on the meta device):
    bad input stops here, before a run directory or a progress bar exists."""
    with torch.device("meta"):
        build_loss(options.loss, data.num_classes, options.embed_dim, **loss_hparams(options, data))


def build_model(options: TrainOptions, data: TrainData) -> tuple[ProjectionHead, torch.nn.Module]:
    """Head and loss, seeded; raises ValueError for impossible options before anything is written."""
    torch.manual_seed(options.seed)
    head = ProjectionHead(data.dim, options.embed_dim, options.dropout)
    loss = build_loss(options.loss, data.num_classes, options.embed_dim, **loss_hparams(options, data))
    return head.to(options.device), loss.to(options.device)


def make_optimizer(params: list[torch.nn.Parameter], options: TrainOptions) -> torch.optim.Optimizer:
    """Adam with coupled weight decay (the paper's), AdamW (decoupled) or SGD with momentum. Adam and AdamW
    use the fused kernel (one pass, no temporaries the size of the class weights; 4x faster than the
    default on a CPU at M4D-35k size) on CPU and CUDA."""
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay, fused=True)
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)
    return torch.optim.Adam(params, lr=options.lr, weight_decay=options.weight_decay, fused=True)


def lr_at(it: int, total: int, steps_per_epoch: int, o: TrainOptions) -> float:
    """Warm-up over ``warmup_epochs`` (linear from lr / steps, or exponential from lr / 100), then cosine
    down to ``min_lr``, per iteration."""
    warm = int(round(o.warmup_epochs * steps_per_epoch))
    if it < warm:
        if o.warmup == "exponential":
            return o.lr * 0.01 ** (1 - (it + 1) / warm)
        return o.lr * (it + 1) / warm
    progress = (it - warm) / max(1, total - warm)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class StepInfo:
    epoch: int
    step: int
    steps_per_epoch: int
    loss: torch.Tensor  # detached; reading it waits for the GPU, so read it only now and then


@dataclass
class TrainResult:
    head: ProjectionHead
    loss: torch.nn.Module
    metrics: list[dict[str, Any]]
    seconds: float
    complete: bool
    out: Path | None


def train(
    data: TrainData,
    options: TrainOptions,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train a head; with ``out``, write the run directory as it goes (each finished epoch is kept), as its
    only writer (a second process training into it is refused)."""
    out = location(out) if out is not None else None
    if options.views and data.views is None:
        raise CacheError(f"{data.cache_path}: --views needs the cache's augmented views, and they were not loaded "
                         "(load_train_data(..., views=True))")
    if out is None:
        return _train(data, options, None, None, resume, overwrite, on_step)
    with exclusive(out, "a training run"), working_copy(out) as copy, named_as(copy.path, out):
        return _train(data, options, out, copy, resume, overwrite, on_step)


def _train(data, options, out, copy, resume, overwrite, on_step) -> TrainResult:
    """The loop; the run directory (with ``out``) is written into ``copy``, pushed to ``out`` after each epoch
    when it is on an object store."""
    local = copy.path if copy is not None else None
    head, loss_fn = build_model(options, data)
    opt = make_optimizer([*head.parameters(), *loss_fn.parameters()], options)
    order = torch.Generator().manual_seed(options.seed)
    n = len(data.labels)
    steps_per_epoch = math.ceil(n / options.batch_size)
    total = options.epochs * steps_per_epoch
    config = _config(data, options, head)
    metrics: list[dict[str, Any]] = []
    start_epoch, seconds = 0, 0.0
    if out is not None:
        start_epoch, seconds, metrics = _open_run_dir(local, config, resume, overwrite, head, loss_fn, opt, order)
        copy.push(WRITE_ORDER)

    complete = start_epoch >= options.epochs
    try:
        for epoch in range(start_epoch, options.epochs):
            t0 = time.perf_counter()
            head.train()
            loss_fn.train()
            perm = torch.randperm(n, generator=order).to(options.device)
            draw = view_draw(data, options.seed, epoch) if options.views else None
            step_losses = torch.zeros(steps_per_epoch, device=options.device)
            correct = torch.zeros((), dtype=torch.int64, device=options.device)
            for step in range(steps_per_epoch):
                lr = lr_at(epoch * steps_per_epoch + step, total, steps_per_epoch, options)
                for group in opt.param_groups:
                    group["lr"] = lr
                idx = perm[step * options.batch_size:(step + 1) * options.batch_size]
                y = data.labels.index_select(0, idx)
                opt.zero_grad(set_to_none=True)  # before the forward: last step's gradients are freed first
                loss, hits = loss_fn.forward_with_hits(head(batch_features(data, idx, draw)), y)
                loss.backward()
                opt.step()
                step_losses[step] = loss.detach() * len(idx)
                correct += hits.sum()
                if on_step is not None:
                    on_step(StepInfo(epoch, step, steps_per_epoch, loss.detach()))
            epoch_loss, epoch_correct = float(step_losses.sum()), int(correct)  # waits for the GPU's queued work
            if not math.isfinite(epoch_loss):
                bad = int(torch.nonzero(~torch.isfinite(step_losses))[0])
                raise RunError(f"epoch {epoch + 1}, step {bad + 1} of {steps_per_epoch}: the training loss is "
                               f"{float(step_losses[bad])}; "
                               f"stopped{f' ({out} keeps the {len(metrics)} finished epochs, not complete)' if out else ''}. "
                               "Try a lower --lr or another loss scale")
            epoch_seconds = time.perf_counter() - t0
            seconds += epoch_seconds
            metrics.append({
                "epoch": epoch + 1,
                "loss": round(epoch_loss / n, 6),
                "train_acc": round(epoch_correct / n, 6),
                "lr": lr,
                "seconds": round(epoch_seconds, 4),
            })
            if out is not None:
                _save_epoch(local, config, metrics, seconds, head, loss_fn, opt, order, done=epoch + 1 == options.epochs)
                copy.push(WRITE_ORDER)
        complete = True
    except KeyboardInterrupt:
        if out is None:
            raise
    head.eval()
    loss_fn.eval()
    return TrainResult(head, loss_fn, metrics, seconds, complete, out)


def _config(data: TrainData, options: TrainOptions, head: ProjectionHead) -> dict[str, Any]:
    spec = LOSSES[canonical_name(options.loss)]
    resolved = {k: v for k, v in spec.defaults.items() if k != "class_counts"}
    resolved.update({k: v for k, v in options.loss_opts.items() if v is not None})
    resolved.update(sample_fraction=options.sample_classes, precision=options.precision)
    return {
        "featcache_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "epochs_done": 0,
        "cache": {"path": absolute(data.cache_path, resolve=True), "key": data.cache_key, "backbone": data.backbone, "dim": data.dim,
                  "feature_space": data.feature_space},
        "options": {**asdict(options), "loss": spec.name, "loss_opts": resolved},
        "head": head.config(),
        "data": {"train_rows": len(data.labels), "classes": data.num_classes, "skipped_invalid": data.skipped_invalid,
                 **({"augmentation": data.augmentation} if options.views else {})},
        "train_seconds": 0.0,
    }


def _open_run_dir(out, config, resume, overwrite, head, loss_fn, opt, order):
    """Create the run directory, or pick up its last finished epoch with ``resume``. Never deletes anything
    but the files a run is made of (RUN_FILES), and those only with ``overwrite``."""
    old = read_config(out)
    if resume:
        if old is None:
            raise RunError(f"{out}: no run to resume (no {CONFIG}); leave out --resume to start one")
        if old.get("complete"):
            raise RunError(f"{out}: already complete; nothing to resume")
        # options added since the run was made have their defaults there
        before = {**asdict(TrainOptions()), **old["options"]}
        before["loss_opts"] = old["options"].get("loss_opts", {})
        if before != config["options"] or old["cache"]["key"] != config["cache"]["key"]:
            raise RunError(f"{out}: was trained with other options or another cache; --resume needs the same command")
        state = load_state(out)
        if state is not None:
            head.load_state_dict(state["head"])
            loss_fn.load_state_dict(state["loss"])
            opt.load_state_dict(state["optimizer"])
            order.set_state(state["order_rng"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            config["created"] = old["created"]
            epoch = int(state["epoch"])
            return epoch, old["train_seconds"], read_metrics(out)[:epoch]
        if old.get("epochs_done", 0) > 0:
            raise RunError(f"{out}: {old['epochs_done']} epoch(s) done but {STATE} is missing, so it cannot be resumed; "
                           "it is left as it is (train again with another --out)")
        # stopped before its first epoch finished: nothing to keep, so it starts over in place
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        if old is None:
            kind = "a file" if not out.is_dir() else "a folder that is not a featcache run"
            raise RunError(f"{out} is {kind}; nothing was changed: choose another --out")
        if not overwrite:
            raise RunError(f"{out} already holds a run; pass --overwrite to replace it, --resume to continue it, "
                           "or choose another --out")
        remove_run_files(out)
    start_run(out, config)
    return 0, 0.0, []


def _save_epoch(out, config, metrics, seconds, head, loss_fn, opt, order, done: bool) -> None:
    """Everything of a finished epoch, each file atomically; the head is usable after every epoch."""
    save_weights(out, head, loss_fn)
    write_metrics(out, metrics)
    if not done:
        save_state(out, {
            "epoch": len(metrics),
            "head": head.state_dict(),
            "loss": loss_fn.state_dict(),
            "optimizer": opt.state_dict(),
            "order_rng": order.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        })
    config.update(complete=done, epochs_done=len(metrics), train_seconds=round(seconds, 4))
    write_config(out, config)
    if done:  # only once config.json says complete: a crash in between leaves a resumable run
        remove_state(out)

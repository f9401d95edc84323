"""The training options and their defaults, the paper's recipe, stated once: ``train-head`` and ``sweep``
take their defaults from here. Light on purpose (no torch): the command line reads it at start-up."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

OPTIMIZERS = ("adam", "adamw", "sgd")
WARMUPS = ("linear", "exponential")


@dataclass
class TrainOptions:
    """Everything that decides the trained head. Defaults are the paper's recipe."""

    loss: str = "subcenter-arcface"
    loss_opts: dict[str, float] = field(default_factory=dict)  # scale, margin, sub_centers, ...; absent = loss default
    embed_dim: int = 64
    dropout: float = 0.2
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-2
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr: float = 1e-3
    seed: int = 42
    device: str = "cpu"
    precision: str = "fp32"  # of the class-logit matmul: fp32 or bf16
    sample_classes: float = 1.0  # Partial FC: fraction of the non-batch classes used per step
    optimizer: str = "adam"  # adam (coupled weight decay, the paper's), adamw (decoupled) or sgd
    momentum: float = 0.9  # sgd only
    warmup: str = "linear"  # linear, or exponential: lr * 0.01 ** (1 - (it + 1) / warm-up steps)
    views: bool = False  # each epoch, train each row on one of its clean and augmented views (cache `augmented`)

    def __post_init__(self) -> None:
        """The training options, checked here once; the loss checks its own (``sample_classes`` is its
        ``sample_fraction``, ``precision`` its matmul precision) when it is built (``check_options``)."""
        for name, value, ok in [
            ("--embed-dim", self.embed_dim, self.embed_dim >= 1),
            ("--dropout", self.dropout, 0 <= self.dropout < 1),
            ("--epochs", self.epochs, self.epochs >= 1),
            ("--batch-size", self.batch_size, self.batch_size >= 1),
            ("--lr", self.lr, self.lr > 0),
            ("--min-lr", self.min_lr, 0 <= self.min_lr <= self.lr),
            ("--weight-decay", self.weight_decay, self.weight_decay >= 0),
            ("--warmup-epochs", self.warmup_epochs, 0 <= self.warmup_epochs <= self.epochs),
            ("--momentum", self.momentum, 0 <= self.momentum < 1),
        ]:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} {value}: must be a finite number")
            if not ok:
                raise ValueError(f"{name} {value}: out of range")
        for name, value, choices in [("--optimizer", self.optimizer, OPTIMIZERS), ("--warmup", self.warmup, WARMUPS)]:
            if value not in choices:
                raise ValueError(f"{name} {value}: expected one of {', '.join(choices)}")

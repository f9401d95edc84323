"""The projection head trained on top of the frozen backbone: Dropout -> Linear(D -> E), as in the paper."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """``Dropout(p) -> Linear(in_dim -> embed_dim)``, with ``hidden`` extra Linear+GELU layers before the
    last one when asked (the paper uses none: no BN, no activation)."""

    def __init__(self, in_dim: int, embed_dim: int = 64, dropout: float = 0.2, hidden: tuple[int, ...] = ()):
        super().__init__()
        self.in_dim, self.embed_dim, self.dropout_p, self.hidden = in_dim, embed_dim, dropout, tuple(hidden)
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU()]
            width = h
        layers.append(nn.Linear(width, embed_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "embed_dim": self.embed_dim, "dropout": self.dropout_p, "hidden": list(self.hidden)}

"""What every backbone family builds: a frozen image encoder with its eval transform and provenance."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn

from featcache.extract.backbones.registry import BackboneError, BackboneSpec

RANDOM_INIT_SEED = 0


class Backbone(nn.Module):
    """A frozen image encoder: ``forward(images) -> (B, dim)`` raw features, before any normalisation."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, encode: Callable, transform: Callable,
                 preprocessing: dict[str, Any], weights: str, image_size: tuple[int, int]):
        super().__init__()
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self._encode = encode  # encode(model, images): the model is passed in, so copies (.to(dtype)) use their own
        self.transform = transform
        self.preprocessing = preprocessing
        self.weights = weights  # what the weights are: "sha256:<hex>", "hub:<id>" or "random-init(seed=0)"
        self.image_size = image_size
        self.dim = self._probe_dim()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(self.model, images)

    @torch.inference_mode()
    def _probe_dim(self) -> int:
        device = next(self.model.parameters()).device
        return int(self(torch.zeros(1, 3, *self.image_size, device=device)).shape[-1])

    def describe(self) -> dict[str, Any]:
        """What the cache records about the backbone (and hashes into its key)."""
        return {
            "name": self.spec.name,
            "library": self.spec.library,
            "arch": self.spec.arch,
            "pretrained": self.spec.pretrained,
            "weights": self.weights,
            "dim": self.dim,
        }


# Exceptions (by class name, so no hub client is imported to check) that mean "no network and no local copy".
_OFFLINE = {"LocalEntryNotFoundError", "ConnectError", "ConnectionError", "gaierror", "ConnectTimeout"}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def missing_weights(spec: BackboneSpec, hub_id: str | None, err: BaseException) -> BackboneError:
    """One line for pretrained weights that could not be loaded: which model, from where, and why, with
    the reason taken from the deepest cause (the hub client's own messages are long and generic)."""
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    names = {type(c).__name__ for c in chain}
    if "OfflineModeIsEnabled" in names:
        reason = "HF_HUB_OFFLINE is set and no copy is in the local cache"
    elif names & _OFFLINE:
        reason = f"the hub cannot be reached ({_first_line(chain[-1])}) and no copy is in the local cache"
    else:
        reason = _first_line(err)
    reason = reason if len(reason) <= 200 else reason[:197].rsplit(" ", 1)[0] + "..."
    where = f" (hub id {hub_id.rstrip('/')})" if hub_id else ""
    return BackboneError(
        f"cannot load pretrained weights for {spec.name} = {spec.label}{where}: {reason}. "
        f"Download the checkpoint on a machine with network and pass it with --weights FILE."
    )


@contextmanager
def quiet_library_logs():
    """No log output while a model library runs: open_clip warns on the root logger about random init,
    and the hub client logs every retry of a download. We report failures ourselves, in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)

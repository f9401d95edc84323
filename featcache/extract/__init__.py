"""Stage one: frozen backbones (``backbones/``) run once over a manifest's images, their embeddings
written into a feature cache (``pipeline``)."""

from featcache.extract.backbones import create_backbone
from featcache.extract.pipeline import run_extract

__all__ = ["create_backbone", "run_extract"]

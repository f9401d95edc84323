"""Backbones: the registry (``registry``), one factory (``factory.create_backbone``) and one file per
model family (``open_clip_models``, ``timm_models``)."""

from featcache.extract.backbones.base import Backbone
from featcache.extract.backbones.factory import create_backbone, describe_registry
from featcache.extract.backbones.registry import REGISTRY, BackboneError, BackboneSpec, resolve_spec

__all__ = ["REGISTRY", "Backbone", "BackboneError", "BackboneSpec", "create_backbone", "describe_registry", "resolve_spec"]

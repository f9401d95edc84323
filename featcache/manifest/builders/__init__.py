"""Builders: each source dataset's own annotation files turned into manifest rows (one file per source)."""

from featcache.manifest.builders.common import Builder
from featcache.manifest.builders.registry import BUILDERS, build

__all__ = ["BUILDERS", "Builder", "build"]

"""Manifests, the CSV lists of images that every stage starts from: the schema (``schema``), one
builder per source dataset (``builders/``), curation (``curate``), recipes that build a whole
training set (``recipe``) and the pre-flight check of a manifest's images (``check``)."""

from featcache.manifest.schema import (
    DEFAULT_SPLIT,
    Manifest,
    ManifestError,
    Rows,
    read_manifest,
    resolve,
    write_manifest,
)

__all__ = ["DEFAULT_SPLIT", "Manifest", "ManifestError", "Rows", "read_manifest", "resolve", "write_manifest"]

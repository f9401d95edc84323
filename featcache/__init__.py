"""featcache: cache frozen-backbone image embeddings once, then train and evaluate retrieval heads from
the cache. The package's folders follow the pipeline: ``manifest`` -> ``extract`` -> ``cache`` ->
``train`` -> ``evaluate``; ``cli`` is the command line on top.

The entry points most scripts need import from here: ``FeatureCache`` (a cache), ``Run`` (a trained
head), ``read_manifest``, ``create_backbone``, ``run_extract``, ``TrainOptions`` and ``run_eval``
(``featcache.train.train`` trains: the name ``featcache.train`` is the stage's folder).
"""

__version__ = "0.1.0"

# Loaded on first use (PEP 562), so that `import featcache` (and the CLI's --help) stays fast.
_EXPORTS = {
    "FeatureCache": "featcache.cache",
    "Run": "featcache.train.runs",
    "TrainOptions": "featcache.train.options",
    "read_manifest": "featcache.manifest.schema",
    "create_backbone": "featcache.extract.backbones.factory",
    "run_extract": "featcache.extract.pipeline",
    "run_eval": "featcache.evaluate.protocols",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")

"""Stage two: a projection head (``heads``) and a margin loss (``losses/``) trained from a feature
cache by one readable loop (``loop``) into a run directory (``runs``); ``sweep`` trains a grid of them;
``options`` holds the training options and their defaults.

The names below load their module on first use: the command line reads ``options`` for its defaults
without importing torch."""

from importlib import import_module

_WHERE = {"ProjectionHead": "heads", "TrainOptions": "options", "load_train_data": "loop", "train": "loop",
          "Run": "runs"}

__all__ = ["ProjectionHead", "Run", "TrainOptions", "load_train_data", "train"]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"featcache.train.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'featcache.train' has no attribute {name!r}")

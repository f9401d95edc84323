"""Stage three: exact search (``search``), the retrieval metrics (``metrics``), the GUIEC / UnED
protocols on caches and runs (``protocols``), the zero-shot baselines (``baselines``) and pictures of
the results (``plots``).

The names below load their module on first use: the command line imports ``baselines`` and ``metrics``
for its choices without paying for torch and faiss."""

from importlib import import_module

_WHERE = {"evaluate": "metrics", "EvalSet": "protocols", "run_eval": "protocols", "l2_normalize": "search",
          "search": "search"}

__all__ = ["EvalSet", "evaluate", "l2_normalize", "run_eval", "search"]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"featcache.evaluate.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'featcache.evaluate' has no attribute {name!r}")

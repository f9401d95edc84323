"""Stage three: exact search (``search``), the retrieval metrics (``metrics``), the GUIEC / UnED
protocols on caches and runs (``protocols``) and pictures of the results (``plots``)."""

from featcache.evaluate.metrics import evaluate
from featcache.evaluate.protocols import EvalSet, run_eval
from featcache.evaluate.search import l2_normalize, search

__all__ = ["EvalSet", "evaluate", "l2_normalize", "run_eval", "search"]

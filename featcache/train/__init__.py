"""Stage two: a projection head (``heads``) and a margin loss (``losses/``) trained from a feature
cache by one readable loop (``loop``) into a run directory (``runs``); ``sweep`` trains a grid of them."""

from featcache.train.heads import ProjectionHead
from featcache.train.loop import TrainOptions, load_train_data, train
from featcache.train.runs import Run

__all__ = ["ProjectionHead", "Run", "TrainOptions", "load_train_data", "train"]

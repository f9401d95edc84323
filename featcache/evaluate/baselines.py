"""The zero-shot baselines: a backbone's features scored without a trained head.

- ``pooled``: the paper's baseline, the feature averaged in consecutive groups down to 64 values;
- ``raw``: the feature as it is.

Light on purpose (numpy only): the command line builds its ``--zero-shot`` choices from ``ZERO_SHOT``.
"""

from __future__ import annotations

import numpy as np

ZERO_SHOT = ("pooled", "raw")
POOLED_DIM = 64


def pooled(features: np.ndarray, dim: int = POOLED_DIM) -> np.ndarray:
    """The paper's zero-shot baseline: the feature averaged in consecutive groups down to ``dim`` values
    (1152 -> 64 averages 18 dims each; sizes that do not divide evenly get groups differing by one)."""
    d = features.shape[1]
    if d <= dim:
        return features.astype(np.float32)
    edges = np.linspace(0, d, dim + 1).round().astype(int)
    sums = np.add.reduceat(features.astype(np.float32), edges[:-1], axis=1)
    return sums / np.diff(edges)[None, :]

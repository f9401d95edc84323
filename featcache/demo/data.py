"""The offline demo set: scikit-learn's bundled handwritten digits written out as image files.

1,797 real scanned digits (8x8, 17 grey levels) become 32x32 PNGs with a manifest. Digits 0-5 are
the training classes; digits 6-9, never seen in training (as in the challenge), are split into
query (every fifth image of a class) and index.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from featcache.manifest.schema import write_manifest

DEMO_DIR = Path("manifests") / "demo"
TRAIN_DIGITS = range(0, 6)
QUERY_EVERY = 5
SCALE = 4  # 8x8 -> 32x32, nearest neighbour so the scan's pixels stay visible in plots


def write_digits(dest: Path = DEMO_DIR) -> Path:
    """Write the images (if missing) and the manifest under ``dest``; returns the manifest path."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images_dir = dest / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    seen = np.zeros(10, dtype=int)
    paths, labels, splits = [], [], []
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        name = f"images/digit{target}_{i:04d}.png"
        file = dest / name
        if not file.exists():
            ink = np.rint(pixels * (255 / 16)).astype(np.uint8)
            tmp = file.with_name(file.name + ".tmp")
            Image.fromarray(255 - ink, "L").resize((8 * SCALE, 8 * SCALE), Image.NEAREST).save(tmp, format="PNG")
            os.replace(tmp, file)  # a killed demo never leaves a truncated image that later runs trust
        if target in TRAIN_DIGITS:
            split = "train"
        else:
            split = "query" if seen[target] % QUERY_EVERY == 0 else "index"
            seen[target] += 1
        paths.append(name)
        labels.append(str(target))
        splits.append(split)
    return write_manifest(dest / "digits.csv", paths, labels, ["digits"] * len(paths), splits)

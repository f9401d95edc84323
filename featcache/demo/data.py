"""The offline demo set: scikit-learn's bundled handwritten digits written out as image files.

1,797 real scanned digits (8x8, 17 grey levels) become 32x32 PNGs with a manifest. Digits 0-5 are
the training classes, less every fourth image of each, held out; digits 6-9 are never seen in
training (as in the challenge). Held-out and unseen images are split into query (every fifth image of
a class) and index; their domains, "digits 0-5" and "digits 6-9", score seen and unseen classes apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from featcache.files import write_file
from featcache.manifest.schema import write_manifest

DEMO_DIR = Path("manifests") / "demo"
TRAIN_DIGITS = range(0, 6)
HOLD_OUT_EVERY = 4  # of the training digits' images, every fourth is held out for evaluation
QUERY_EVERY = 5
SEEN, UNSEEN = "digits 0-5", "digits 6-9"
SCALE = 4  # 8x8 -> 32x32, nearest neighbour so the scan's pixels stay visible in plots


def write_digits(dest: Path = DEMO_DIR) -> Path:
    """Write the images (if missing) and the manifest under ``dest``; returns the manifest path."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images_dir = dest / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    count = np.zeros(10, dtype=int)  # images of each digit so far
    held = np.zeros(10, dtype=int)  # held-out or unseen images of each digit so far
    paths, labels, domains, splits = [], [], [], []
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        name = f"images/digit{target}_{i:04d}.png"
        file = dest / name
        if not file.exists():
            ink = np.rint(pixels * (255 / 16)).astype(np.uint8)
            image = Image.fromarray(255 - ink, "L").resize((8 * SCALE, 8 * SCALE), Image.NEAREST)
            # atomic: a killed demo never leaves a truncated image that later runs trust
            write_file(file, lambda tmp, image=image: image.save(tmp, format="PNG"))
        if target in TRAIN_DIGITS and count[target] % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1:
            split = "train"
        else:
            split = "query" if held[target] % QUERY_EVERY == 0 else "index"
            held[target] += 1
        count[target] += 1
        paths.append(name)
        labels.append(str(target))
        domains.append(SEEN if target in TRAIN_DIGITS else UNSEEN)
        splits.append(split)
    return write_manifest(dest / "digits.csv", paths, labels, domains, splits)

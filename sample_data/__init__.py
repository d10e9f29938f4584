"""The embedded default data: scikit-learn's handwritten digits, split train / val / test.

scikit-learn ships the 1,797 8×8 digit images inside its package, so the tool runs on a fresh
machine with no download. This package gives the arrays and how to split them; the engine builds
and splits the dataset (:func:`engine.data.load_sample`), so nothing here imports the engine.
``examples/`` beside this file shows the image-folder and CSV-manifest layouts for users' own data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).parent / "examples"
SOURCE = "sample (scikit-learn digits)"
SPLITS = ("train", "val", "test")
# 60 / 20 / 20: the validation split doubles as the trusted set for VM/FVM, so it gets as much
# as the test split; a fixed seed makes "sample" the same data on every machine.
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
SPLIT_SEED = 0


def digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The digits as uint8 images in 0..255, their int64 labels and the class names "0".."9"."""
    from sklearn.datasets import load_digits

    loaded = load_digits()
    # Pixel values are 0..16 in scikit-learn; rescale to the usual 0..255 uint8 range.
    images = np.round(loaded.images * (255.0 / 16.0)).astype(np.uint8)
    return images, loaded.target.astype(np.int64), tuple(str(c) for c in range(10))

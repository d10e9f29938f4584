"""The embedded default data: scikit-learn's handwritten digits, split train / val / test.

scikit-learn ships the 1,797 8×8 digit images inside its package, so the tool runs on a fresh
machine with no download. ``examples/`` beside this file shows the image-folder and CSV-manifest
layouts for users' own data.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).parent / "examples"
# 60 / 20 / 20: the validation split doubles as the trusted set for VM/FVM, so it gets as much
# as the test split; a fixed seed makes "sample" the same data on every machine.
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _digits_splits():
    from sklearn.datasets import load_digits

    from engine.data import Dataset, stratified_split

    digits = load_digits()
    # Pixel values are 0..16 in scikit-learn; rescale to the usual 0..255 uint8 range.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    full = Dataset(images, digits.target.astype(np.int64), tuple(str(c) for c in range(10)),
                   source="sample (scikit-learn digits)")
    return dict(zip(("train", "val", "test"), stratified_split(full, SPLIT_FRACTIONS, seed=SPLIT_SEED)))


def load_digits_split(split: str):
    """One split of the digits as an :class:`engine.data.Dataset` (indices are digit positions)."""
    return _digits_splits()[split]

"""Noise injection flips exactly the requested number of labels, to other classes, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data import inject_noise
from engine.errors import DataError, OptionError
from engine.pipeline import with_injected_noise

LABELS = np.repeat(np.arange(7), 43)  # N = 301, C = 7: rate·N is never a whole number below


@pytest.mark.parametrize("kind", ["symmetric", "pair"])
@pytest.mark.parametrize("rate", [0.0, 0.013, 0.2, 0.45, 0.9])
def test_flips_exactly_round_rate_n_labels_and_each_changes(kind, rate):
    noisy, flipped = inject_noise(LABELS, 7, rate=rate, kind=kind, seed=1)
    assert flipped.dtype == bool and flipped.shape == LABELS.shape
    assert flipped.sum() == round(rate * len(LABELS))
    np.testing.assert_array_equal(noisy != LABELS, flipped)  # every flip differs, nothing else moves
    assert noisy.min() >= 0 and noisy.max() < 7


def test_pair_flip_maps_each_class_to_the_next():
    noisy, flipped = inject_noise(LABELS, 7, rate=0.3, kind="pair", seed=5)
    np.testing.assert_array_equal(noisy[flipped], (LABELS[flipped] + 1) % 7)
    assert (LABELS[flipped] == 6).any()  # the wrap-around 6 → 0 is exercised


def test_symmetric_flip_reaches_every_other_class():
    noisy, flipped = inject_noise(LABELS, 7, rate=0.5, kind="symmetric", seed=2)
    pairs = set(zip(LABELS[flipped].tolist(), noisy[flipped].tolist(), strict=True))
    assert len(pairs) == 7 * 6  # ~150 flips over 42 (from, to) pairs: all of them occur


@pytest.mark.parametrize("kind", ["symmetric", "pair"])
def test_same_seed_same_noise_other_seed_other_noise(kind):
    first = inject_noise(LABELS, 7, rate=0.2, kind=kind, seed=11)
    again = inject_noise(LABELS, 7, rate=0.2, kind=kind, seed=11)
    other = inject_noise(LABELS, 7, rate=0.2, kind=kind, seed=12)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_input_labels_are_not_modified():
    labels = LABELS.copy()
    inject_noise(labels, 7, rate=0.4, seed=0)
    np.testing.assert_array_equal(labels, LABELS)


def test_with_injected_noise_keeps_the_truth(make_dataset):
    data = make_dataset(classes=4, per_class=10)
    noisy = with_injected_noise(data, rate=0.25, kind="pair", seed=3)
    np.testing.assert_array_equal(noisy.clean_labels, data.labels)
    np.testing.assert_array_equal(noisy.dataset.labels != data.labels, noisy.flipped)
    np.testing.assert_array_equal(noisy.dataset.images, data.images)


def test_bad_noise_options_are_refused():
    with pytest.raises(OptionError, match="valid choices: symmetric, pair"):
        inject_noise(LABELS, 7, rate=0.1, kind="asymmetric")
    with pytest.raises(DataError, match=r"noise rate must be in \[0, 1\)"):
        inject_noise(LABELS, 7, rate=1.0)

"""Review-depth estimate and misuse guards, on constructed cases where the answer is known."""

from types import SimpleNamespace

import numpy as np
import pytest

from engine.data import Dataset
from engine.guidance import (
    TRAINED_MODEL_SOURCE,
    cleaning_test_set_warnings,
    estimate_review_depth,
    label_error_probability,
    model_warnings,
    review_estimate,
    validation_warnings,
)


def _dataset(n_per_class: int, classes: int = 3, offset: int = 0) -> Dataset:
    labels = np.repeat(np.arange(classes), n_per_class)
    images = ((np.arange(len(labels))[:, None, None] + offset) * np.ones((1, 4, 4))).astype(np.uint8)
    return Dataset(images, labels, tuple(f"c{i}" for i in range(classes)))


def _codes(advice) -> set[str]:
    return {a.code for a in advice}


def test_calibrated_probabilities_give_the_true_precision_curve():
    rng = np.random.default_rng(0)
    n = 20_000
    prob = rng.beta(0.3, 2.0, size=n)  # a model's P(label wrong), calibrated by construction
    is_error = rng.random(n) < prob
    scores = prob + rng.normal(0, 0.05, size=n)  # a ranking correlated with it
    est = estimate_review_depth(scores, prob)
    order = np.argsort(-scores, kind="stable")
    for depth in (200, 1000, 5000):
        true_precision = is_error[order[:depth]].mean()
        sampling_sd = np.sqrt(true_precision * (1 - true_precision) / depth)
        assert est.precision_at(depth) == pytest.approx(true_precision, abs=3 * sampling_sd + 0.005)
    assert est.expected_total == pytest.approx(is_error.sum(), rel=0.05)
    assert np.all(np.diff(est.marginal) <= 1e-12)  # non-increasing along the ranking
    assert est.marginal[est.stop_depth - 1] >= 0.5 > est.marginal[est.stop_depth]


def test_decisions_recalibrate_an_overconfident_model():
    rng = np.random.default_rng(1)
    n = 5_000
    true_prob = rng.beta(0.3, 2.0, size=n)
    is_error = rng.random(n) < true_prob
    overconfident = true_prob ** 3  # the model says "probably fine" far too often
    scores = true_prob
    before = estimate_review_depth(scores, overconfident)
    reviewed = rng.choice(n, size=400, replace=False)  # a reviewer samples across the ranking
    after = estimate_review_depth(scores, overconfident, reviewed_rows=reviewed, reviewed_is_error=is_error[reviewed])
    truth = is_error.sum()
    assert abs(after.expected_total - truth) < 0.5 * abs(before.expected_total - truth)
    assert after.found == int(is_error[reviewed].sum()) and after.reviewed == 400


def test_label_error_probability_is_one_minus_given_class_probability():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert label_error_probability(probs, np.array([0, 0])) == pytest.approx([0.3, 0.9])


def test_review_estimate_reads_the_validation_model_before_the_trained_model():
    labels = np.array([0, 1, 1, 0])
    held_out = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.3, 0.7]])
    memorized = np.eye(2)[labels]  # the trained model fits every given label
    scores = np.array([0.1, 0.9, 0.2, 0.6])
    plain = {"loss": SimpleNamespace(scores=scores, arrays={})}
    estimate = review_estimate(plain, "loss", labels, memorized)
    assert estimate.source == TRAINED_MODEL_SOURCE and estimate.expected_total == pytest.approx(0.0, abs=1e-3)
    with_fvm = {**plain, "fvm-loss": SimpleNamespace(scores=scores, arrays={"probabilities": held_out})}
    estimate = review_estimate(with_fvm, "loss", labels, memorized)
    assert estimate.source == "fvm-loss"
    assert estimate.expected_total == pytest.approx(0.1 + 0.8 + 0.1 + 0.7, abs=1e-3)
    assert estimate.cleanlab_total is None


def test_validation_guards_fire_only_when_they_should():
    train = _dataset(20)
    good = _dataset(10, offset=100)
    assert validation_warnings(train, good) == []
    overlapping = _dataset(10)  # the same pixel patterns as the first training images
    assert "validation-overlap" in _codes(validation_warnings(train, overlapping))
    tiny = _dataset(2, offset=100)
    assert _codes(validation_warnings(train, tiny)) == {"validation-small"}
    missing = good.subset(good.labels != 2)
    assert "validation-missing-classes" in _codes(validation_warnings(train, missing))
    assert _codes(validation_warnings(train, good, trusted=False)) == {"validation-untrusted"}


def test_cleaning_the_test_set_is_flagged():
    train = _dataset(20)
    assert cleaning_test_set_warnings(train, _dataset(5, offset=100)) == []
    assert _codes(cleaning_test_set_warnings(train, train)) == {"cleaning-test-set"}


def test_model_guards():
    converged = [{"loss": 1.0, "accuracy": 0.8}, {"loss": 0.52, "accuracy": 0.85}, {"loss": 0.5, "accuracy": 0.86}]
    assert model_warnings(history=converged) == []
    falling = [{"loss": 2.0, "accuracy": 0.3}, {"loss": 1.5, "accuracy": 0.45}, {"loss": 1.0, "accuracy": 0.6}]
    assert _codes(model_warnings(history=falling)) == {"not-converged"}
    assert _codes(model_warnings(history=converged, flagged_train_accuracy=0.99)) == {"memorized"}
    assert model_warnings(history=converged, flagged_train_accuracy=0.40) == []
    weak = model_warnings(history=converged, validation_accuracy=0.55)
    assert _codes(weak) == {"weak-validation-model"} and "55.0%" in weak[0].message
    assert model_warnings(history=converged, validation_accuracy=0.9) == []

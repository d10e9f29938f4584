"""Detection metrics agree with scikit-learn and with counting by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from engine.metrics import detection_metrics, precision_recall_at, ranking, ranks, top_k

SCORES = np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.05, 0.4, 0.5])
NOISY = np.array([1, 0, 0, 1, 1, 0, 0, 0, 1, 0], dtype=bool)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_ap_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    is_noisy = rng.random(200) < 0.15
    scores = rng.normal(size=200) + 1.5 * is_noisy
    scores[:20] = np.round(scores[:20])  # some ties
    metrics = detection_metrics(scores, is_noisy)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(is_noisy, scores), abs=1e-12)
    assert metrics["ap"] == pytest.approx(average_precision_score(is_noisy, scores), abs=1e-12)


def test_precision_and_recall_at_k_by_hand():
    # Ranked: 0.9(n) 0.8 0.7(n) 0.6 0.5 0.4(n) 0.3(n) 0.2 0.1 0.05 → four noisy rows.
    metrics = detection_metrics(SCORES, NOISY)
    assert metrics["k"] == 4
    assert metrics["precision_at_k"] == 2 / 4 and metrics["recall_at_k"] == 2 / 4
    assert precision_recall_at(SCORES, NOISY, 1) == (1.0, 1 / 4)
    assert precision_recall_at(SCORES, NOISY, 3) == (2 / 3, 2 / 4)
    assert precision_recall_at(SCORES, NOISY, 7) == (4 / 7, 1.0)
    # 10% of N = 1 row; 1% and 2% round to 0 and are clamped to one row.
    assert metrics["precision_at_10pct"] == 1.0 and metrics["recall_at_1pct"] == 1 / 4


def test_perfect_and_reversed_rankings():
    assert detection_metrics(NOISY.astype(float), NOISY)["auroc"] == 1.0
    reversed_metrics = detection_metrics(-NOISY.astype(float), NOISY)
    assert reversed_metrics["auroc"] == 0.0 and reversed_metrics["precision_at_k"] == 0.0


def test_ranking_is_descending_and_stable_on_ties():
    scores = np.array([0.2, 0.9, 0.2, 0.5, 0.9])
    np.testing.assert_array_equal(ranking(scores), [1, 4, 3, 0, 2])
    np.testing.assert_array_equal(top_k(scores, 2), [1, 4])
    np.testing.assert_array_equal(ranks(scores), [4, 1, 5, 3, 2])


def test_metrics_need_both_kinds_of_samples():
    with pytest.raises(ValueError, match="both noisy and clean"):
        detection_metrics(SCORES, np.zeros(10, dtype=bool))

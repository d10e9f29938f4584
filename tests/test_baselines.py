"""Planted label noise on the digits is found by the three baselines; cleanlab is used as-is."""

from __future__ import annotations

import numpy as np
import pytest
from cleanlab.rank import get_label_quality_scores

from engine.config import TrainConfig
from engine.data import load_sample
from engine.metrics import detection_metrics
from engine.pipeline import score_methods, with_injected_noise
from engine.scorers import ScoringContext, make_scorer
from engine.training import train

CONFIG = TrainConfig(epochs=3, seed=0, device="cpu")
# AUROC floors for 20% noise on the digits' train split (N = 1078), small CNN, 3 epochs, CPU.
# Measured with noise seeds 0-9 (training seed = noise seed), worst / best of the ten:
#   symmetric: loss 0.989 / 0.998, margin 0.990 / 0.998, cleanlab 0.981 / 0.994
#   pair:      loss 0.944 / 0.972, margin 0.968 / 0.985, cleanlab 0.930 / 0.959
# Each floor sits about 0.02 below the worst seed.
FLOORS = {
    "symmetric": {"loss": 0.97, "margin": 0.97, "cleanlab": 0.96},
    "pair": {"loss": 0.92, "margin": 0.95, "cleanlab": 0.91},
}


@pytest.fixture(scope="module", params=sorted(FLOORS))
def scored(request):
    noisy = with_injected_noise(load_sample("train"), rate=0.2, kind=request.param, seed=0)
    run = score_methods(noisy.dataset, ["loss", "margin", "cleanlab"], config=CONFIG)
    return request.param, noisy, run


@pytest.mark.parametrize("method", ["loss", "margin", "cleanlab"])
def test_planted_noise_is_found_above_the_floor(scored, method):
    kind, noisy, run = scored
    metrics = detection_metrics(run.results[method].scores, noisy.flipped)
    assert metrics["auroc"] >= FLOORS[kind][method]
    assert noisy.flipped[np.argmax(run.results[method].scores)]  # the most suspicious row is a planted error


def test_loss_and_margin_follow_their_definitions(scored):
    """Brute force from θ*'s logits: loss = −log p_y, margin = max_{c≠y} z_c − z_y."""
    _, noisy, run = scored
    logits, labels = run.context.predictions.logits, noisy.dataset.labels
    rows = np.arange(len(labels))
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(run.results["loss"].scores, -log_p[rows, labels], rtol=1e-9, atol=1e-12)
    others = [max(z for c, z in enumerate(row) if c != y) for row, y in zip(logits, labels, strict=True)]
    np.testing.assert_allclose(run.results["margin"].scores, np.asarray(others) - logits[rows, labels], atol=1e-12)


def test_cleanlab_score_is_one_minus_cleanlab_quality(scored):
    _, noisy, run = scored
    scorer = make_scorer("cleanlab")
    context = ScoringContext(noisy.dataset, run.trained)
    result = scorer.run(context)
    labels = noisy.dataset.labels
    np.testing.assert_allclose(result.scores, 1.0 - get_label_quality_scores(labels, scorer.pred_probs), atol=1e-12)
    np.testing.assert_allclose(result.scores, 1.0 - scorer.pred_probs[np.arange(len(labels)), labels], atol=1e-12)
    np.testing.assert_allclose(scorer.pred_probs.sum(axis=1), 1.0, atol=1e-9)
    # Out-of-fold probabilities cannot have memorised the noisy labels the way θ* has.
    in_sample = (run.context.predictions.predicted == labels).mean()
    assert result.info["cross_validated_accuracy"] < in_sample
    np.testing.assert_array_equal(result.scores, run.results["cleanlab"].scores)  # same seeds, same folds


def test_cleanlab_holds_out_a_class_smaller_than_the_folds_once_per_row(make_dataset):
    """A class of 2 among classes of 6: five folds still, each of its rows held out by one fold."""
    data = make_dataset(classes=3, per_class=6)
    data = data.subset(np.flatnonzero((data.labels != 2) | (np.arange(len(data)) % 6 < 2)))
    trained = train(data, TrainConfig(epochs=2, seed=0, device="cpu"))
    scorer = make_scorer("cleanlab")
    result = scorer.run(ScoringContext(data, trained))
    assert result.info["folds"] == 5 and result.info["classes_smaller_than_folds"] == [data.class_names[2]]
    np.testing.assert_allclose(scorer.pred_probs.sum(axis=1), 1.0, atol=1e-6)  # every row held out exactly once
    tiny = make_dataset(classes=2, per_class=3)
    assert make_scorer("cleanlab").run(ScoringContext(tiny, train(tiny, CONFIG))).info["folds"] == 3

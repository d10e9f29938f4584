"""Review-depth estimate and misuse guards, on constructed cases where the answer is known."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from scipy.special import expit, logit

from engine.data import Dataset, load_dataset
from engine.guidance import (
    TRAINED_MODEL_SOURCE,
    cleaning_test_set_warnings,
    cleanlab_issue_count,
    estimate_review_depth,
    fit_noise_transitions,
    label_error_probability,
    model_warnings,
    noise_aware_error_probability,
    review_estimate,
    scoring_advice,
    spot_check_rows,
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
    overconfident = expit(logit(true_prob) - 2.0)  # the model says "probably fine" far too often
    scores = true_prob
    before = estimate_review_depth(scores, overconfident)
    truth = is_error.sum()
    assert before.expected_total < 0.6 * truth
    top = np.argsort(-scores)
    after = estimate_review_depth(scores, overconfident, reviewed_rows=top[:250], reviewed_is_error=is_error[top[:250]])
    assert abs(after.expected_total - truth) < 0.4 * abs(before.expected_total - truth)  # a reviewer decides the top 5%
    assert after.found == int(is_error[top[:250]].sum()) and after.reviewed == 250
    deeper = estimate_review_depth(scores, overconfident, reviewed_rows=top[:1000],
                                   reviewed_is_error=is_error[top[:1000]])
    assert deeper.calibration[1] == pytest.approx(2.0, abs=0.3)  # the offset the model was off by
    assert deeper.expected_total == pytest.approx(truth, rel=0.05)
    sampled = rng.choice(n, size=400, replace=False)  # or samples across the ranking
    across = estimate_review_depth(scores, overconfident, reviewed_rows=sampled, reviewed_is_error=is_error[sampled])
    assert abs(across.expected_total - truth) < 0.6 * abs(before.expected_total - truth)


def test_a_spot_check_beyond_the_line_corrects_the_tail_where_the_top_cannot():
    rng = np.random.default_rng(2)
    n = 20_000
    model = np.clip(rng.beta(0.3, 6.0, size=n), 1e-4, 1 - 1e-4)
    sure = rng.random(n) < 0.03
    model[sure] = 0.995  # the model is right about its top, and too sure the rest is clean:
    true_prob = np.where(sure, model, expit(logit(model) + 1.5))
    is_error = rng.random(n) < true_prob
    truth = is_error.sum()
    before = estimate_review_depth(model, model)
    top = np.argsort(-model)[:400]
    reviewed_top = estimate_review_depth(model, model, reviewed_rows=top, reviewed_is_error=is_error[top])
    assert abs(reviewed_top.expected_total - truth) > 0.9 * abs(before.expected_total - truth)  # the top says little
    spot = spot_check_rows(reviewed_top, top, 400, seed=0)
    assert len(np.unique(spot)) == 400 and not np.isin(spot, top).any()
    assert np.isin(spot, reviewed_top.order[reviewed_top.stop_depth:]).all()  # all ranked below the line
    np.testing.assert_array_equal(spot, spot_check_rows(reviewed_top, top, 400, seed=0))
    rows = np.concatenate([top, spot])
    checked = estimate_review_depth(model, model, reviewed_rows=rows, reviewed_is_error=is_error[rows])
    assert abs(checked.expected_total - truth) < 0.6 * abs(reviewed_top.expected_total - truth)


def test_label_error_probability_is_one_minus_given_class_probability():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert label_error_probability(probs, np.array([0, 0])) == pytest.approx([0.3, 0.9])


def test_review_estimate_reads_the_validation_model_before_the_trained_model():
    labels = np.array([0, 1, 1, 0, 0])
    held_out = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.3, 0.7], [0.6, 0.4]])
    memorized = np.eye(2)[labels]  # the trained model fits every given label
    scores = np.array([0.1, 0.9, 0.2, 0.6, 0.3])
    plain = {"loss": SimpleNamespace(scores=scores, arrays={})}
    estimate = review_estimate(plain, "loss", labels, memorized)
    assert estimate.source == TRAINED_MODEL_SOURCE and estimate.expected_total == pytest.approx(0.0, abs=1e-3)
    with_fvm = {**plain, "fvm-loss": SimpleNamespace(scores=scores, arrays={"probabilities": held_out})}
    estimate = review_estimate(with_fvm, "loss", labels, memorized)
    assert estimate.source == "fvm-loss" and estimate.cleanlab_total is None
    # brute force over every 2×2 noise matrix T[true, given] on a grid: the likeliest one, then Bayes
    grid = np.linspace(0.0, 1.0, 1001)
    t01, t10 = np.meshgrid(grid, grid, indexing="ij")  # P(given 1 | true 0), P(given 0 | true 1)
    p0 = held_out[:, 0][:, None, None]
    given_0 = p0 * (1 - t01) + (1 - p0) * t10  # P(given label 0)
    likelihood = np.log(np.clip(np.where(labels[:, None, None] == 0, given_0, 1 - given_0), 1e-300, 1)).sum(axis=0)
    i, j = np.unravel_index(np.argmax(likelihood), likelihood.shape)
    transitions = np.array([[1 - grid[i], grid[i]], [grid[j], 1 - grid[j]]])
    joint = held_out * transitions[:, labels].T
    expected = 1 - joint[np.arange(5), labels] / joint.sum(axis=1)
    assert expected.sum() < 0.1 + 0.8 + 0.1 + 0.7 + 0.4  # the labels carry information: fewer than 1 − p_y says
    assert estimate.expected_total == pytest.approx(expected.sum(), abs=0.01)


def test_a_doubtful_model_is_not_read_as_label_errors():
    """A calibrated but weak model of the true class, 10% of labels flipped to a fixed other class:
    1 − p_y counts every doubt of the model as a label error; the likeliest class-conditional noise
    recovers the flips, their total and the precision curve."""
    rng = np.random.default_rng(2)
    n, classes, rate = 20_000, 5, 0.1
    probabilities = rng.dirichlet(np.full(classes, 0.3), size=n)  # the model's (calibrated) P(true class)
    true = (rng.random(n)[:, None] > probabilities.cumsum(axis=1)).sum(axis=1)
    flipped = rng.random(n) < rate
    given = np.where(flipped, (true + 1) % classes, true)  # pair noise: c → c + 1
    raw = label_error_probability(probabilities, given)
    assert raw.sum() > 3 * flipped.sum()  # the bias: the model's doubt, not the labels' noise
    true_transitions = (1 - rate) * np.eye(classes) + rate * np.roll(np.eye(classes), 1, axis=1)
    np.testing.assert_allclose(fit_noise_transitions(probabilities, given), true_transitions, atol=0.03)
    est = estimate_review_depth(raw, noise_aware_error_probability(probabilities, given))
    assert est.expected_total == pytest.approx(flipped.sum(), rel=0.1)
    for depth in (200, 1000, 4000):
        true_precision = flipped[est.order[:depth]].mean()
        assert est.precision_at(depth) == pytest.approx(true_precision, abs=3 * np.sqrt(0.25 / depth) + 0.01)


def test_cleanlab_probabilities_start_from_cleanlabs_count():
    rng = np.random.default_rng(3)
    n, classes = 600, 3
    labels = rng.integers(0, classes, size=n)
    held_out = np.full((n, classes), 0.05)
    held_out[np.arange(n), labels] = 0.9
    wrong = rng.choice(n, size=30, replace=False)
    held_out[wrong] = np.full(classes, 0.05)
    held_out[wrong, (labels[wrong] + 1) % classes] = 0.9  # the held-out model is sure of another class
    results = {"cleanlab": SimpleNamespace(scores=1 - held_out[np.arange(n), labels],
                                           arrays={"probabilities": held_out})}
    estimate = review_estimate(results, "cleanlab", labels, np.eye(classes)[labels])
    count = cleanlab_issue_count(labels, held_out)
    assert estimate.source == "cleanlab" and estimate.cleanlab_total == count and 20 <= count <= 40
    assert estimate.expected_total == pytest.approx(count, abs=1e-3)  # 1 − p_y alone says 0.1 × 570 + 0.9 × 30


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


def test_a_method_scored_without_the_validation_set_gets_no_warning_about_it():
    """Issue 17, finding 8: ``if-last --embeddings`` (a carved validation set) warned "FVM is less reliable"."""
    import pandas as pd

    train, carved = _dataset(20), _dataset(10, offset=100)
    table = pd.DataFrame({"rank": np.arange(1, 61), "given_label": train.labels, "predicted_label": train.labels})
    with_fvm = scoring_advice(train, table, validation=carved, trusted=False, info={})
    assert "validation-untrusted" in _codes(with_fvm)
    without = scoring_advice(train, table, validation=carved, trusted=False, info={}, uses_validation=False)
    assert not {"validation-untrusted", "validation-small", "validation-overlap"} & _codes(without)
    assert _codes(without) == _codes(with_fvm) - {"validation-untrusted"}  # the model's own guards stay


def test_an_overlap_of_image_files_is_found_by_their_content(tmp_path):
    """Copies under other names are counted; files of the same size with other pixels are not (BMPs of one
    size are all the same size); nothing is decoded."""
    def save(path, seed):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)

    for c in range(2):
        for i in range(4):
            save(tmp_path / "train" / f"class_{c}" / f"{i}.bmp", 10 * c + i)
    for c in range(2):
        save(tmp_path / "val" / f"class_{c}" / "other.bmp", 100 + c)
        shutil.copy(tmp_path / "train" / f"class_{c}" / f"{c + 1}.bmp", tmp_path / "val" / f"class_{c}" / "copy.bmp")
    train, validation = load_dataset(tmp_path / "train", lazy=True), load_dataset(tmp_path / "val", lazy=True)
    assert len({path.stat().st_size for path in tmp_path.rglob("*.bmp")}) == 1
    warned = validation_warnings(train, validation)
    assert [a.message.split()[0] for a in warned if a.code == "validation-overlap"] == ["2"]
    assert "validation-overlap" not in _codes(validation_warnings(train.subset([0, 2, 3, 4, 5, 7]), validation))


def test_reviewed_samples_added_to_validation_on_purpose_are_not_an_overlap():
    train = _dataset(20)
    overlapping = _dataset(10)  # copies of training rows 0..29, as closing the loop makes them
    assert _codes(validation_warnings(train, overlapping, reviewed_in_validation=train.index[:30])) == set()
    # a copy that was not reviewed is still a leak, and is counted alone
    warned = validation_warnings(train, overlapping, reviewed_in_validation=train.index[:29])
    assert [a.message.split()[0] for a in warned if a.code == "validation-overlap"] == ["1"]


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
    restarted = model_warnings(history=converged, training_notes=["the training loss became 368 in epoch 3"])
    assert _codes(restarted) == {"training-restarted"} and "368" in restarted[0].message

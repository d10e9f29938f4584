"""Guidance for reviewers: how deep to review a ranking, and warnings about misuse.

The review-depth estimate needs no ground truth. It starts from a per-sample probability that the
given label is wrong, from the model that knows the label least (the validation model θ̃, or
cleanlab's out-of-sample model), with the given labels counted as evidence: under θ̃, the Bayes
posterior with the class-conditional noise that makes the labels likeliest; under cleanlab's model,
1 − p_y moved by one logit offset to cleanlab's count of issues. The decisions already made
(confirmed errors vs. confirmed correct) recalibrate it, and it becomes the expected precision at
every depth of the ranking and the expected number of label errors in the whole set.

Why not 1 − p_y alone: it is the chance that the image belongs to another class *before reading
its label*. Read as P(label wrong) it assumes the labels carry no information, so every doubt of the
model counts as a label error. benchmarks/results/review-depth.md measured that bias: on the MNIST
test set (15 known errors) 1 − p_y under θ̃ sums to 424 and gives an estimated precision of 0.88 in
the top 1% where the true one is 0.03.
"""

from __future__ import annotations

import contextlib
import hashlib
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from scipy.special import expit, logit
from sklearn.isotonic import IsotonicRegression

from engine.data import Dataset, files_folder
from engine.metrics import ranking
from engine.sources import batches, inference_batch, is_lazy

# How many decisions the prior on the calibration is worth: with fewer reviewed samples than this
# the model's own probabilities dominate; with many more, the reviewer's decisions do.
CALIBRATION_PRIOR_WEIGHT = 10.0
_EPS = 1e-6
# The base model "has memorized the noise" when it still predicts the given label of this share of
# the flagged samples. On the digits with 20% noise, θ* fits 0% of FVM's top 5% after 15 epochs and
# 57% after 40 epochs, when the loss ranking has fallen from AUROC 0.998 to 0.90.
MEMORIZED_FLAGGED_ACCURACY = 0.5


@dataclass(frozen=True)
class ReviewEstimate:
    """Estimated precision along a ranking (position 0 = the most suspicious sample)."""

    order: np.ndarray  # row positions, most suspicious first
    marginal: np.ndarray  # P(the sample at this depth is a label error), non-increasing in depth
    precision: np.ndarray  # expected precision of the top-d for d = 1..N
    stop_depth: int  # review down to here: the marginal precision stays ≥ threshold above it
    expected_total: float  # expected number of label errors in the whole set
    found: int  # label errors confirmed so far
    reviewed: int  # samples decided so far
    calibration: tuple[float, float]  # (slope, offset) on the logit of the model's probability; slope is 1
    cleanlab_total: int | None = None  # cleanlab's estimate of the number of issues, when given
    source: str = ""  # whose probabilities the estimate started from (see PROBABILITY_SOURCES)
    prior_noise_rate: float | None = None  # the noise rate the estimate starts from, before any decision

    @property
    def expected_noise_rate(self) -> float:
        return self.expected_total / len(self.order)

    def precision_at(self, depth: int) -> float:
        return float(self.precision[max(1, min(depth, len(self.precision))) - 1])


def _fit_calibration(prob: np.ndarray, outcome: np.ndarray, offset: float) -> tuple[float, float]:
    """Recalibration logit(q') = logit(q) + b from the decisions, MAP with a prior pulling b to ``offset``.

    One parameter, no slope: reviewers decide the top of the ranking, where a slope is not identified,
    and a slope fitted there and extrapolated over the tail turned MNIST's 15 errors into 412 after
    reviewing the top 2% (benchmarks/results/review-depth.md). Returned as (slope 1, b).
    """
    if len(outcome) == 0:
        return 1.0, offset
    z = logit(np.clip(prob, _EPS, 1 - _EPS))

    def objective(b: float) -> float:
        q = np.clip(expit(z + b), _EPS, 1 - _EPS)
        nll = -np.sum(outcome * np.log(q) + (1 - outcome) * np.log(1 - q))
        return nll + 0.5 * CALIBRATION_PRIOR_WEIGHT * (b - offset) ** 2

    return 1.0, float(minimize_scalar(objective, bounds=(-40.0, 40.0), method="bounded",
                                      options={"xatol": 1e-8}).x)


def estimate_review_depth(scores: np.ndarray, error_probability: np.ndarray, *,
                          reviewed_rows: np.ndarray | None = None, reviewed_is_error: np.ndarray | None = None,
                          threshold: float = 0.5, cleanlab_total: int | None = None,
                          prior_offset: float = 0.0) -> ReviewEstimate:
    """Expected precision at each depth of the ranking by ``scores`` (higher = more suspicious).

    ``error_probability[i]`` is a model's probability that row i's label is wrong, moved by
    ``prior_offset`` on the logit scale before any decision (see :func:`offset_matching_total`);
    reviewed rows (positions) with their outcomes (True = a label error: relabeled or dropped)
    recalibrate it, and replace the estimate by the known outcome for those rows.
    """
    scores = np.asarray(scores, dtype=np.float64)
    prob = np.clip(np.asarray(error_probability, dtype=np.float64), 0.0, 1.0)
    if prob.shape != scores.shape:
        raise ValueError("scores and error probabilities must be aligned")
    reviewed_rows = np.asarray([] if reviewed_rows is None else reviewed_rows, dtype=np.int64)
    outcome = np.asarray([] if reviewed_is_error is None else reviewed_is_error, dtype=np.float64)
    a, b = _fit_calibration(prob[reviewed_rows], outcome, prior_offset)
    value = expit(a * logit(np.clip(prob, _EPS, 1 - _EPS)) + b)
    value[reviewed_rows] = outcome
    order = ranking(scores)
    along = value[order]
    depth = np.arange(1, len(order) + 1)
    marginal = IsotonicRegression(increasing=False, y_min=0.0, y_max=1.0).fit_transform(depth, along)
    below = np.flatnonzero(marginal < threshold)
    stop = int(below[0]) if len(below) else len(order)
    return ReviewEstimate(order=order, marginal=marginal, precision=np.cumsum(along) / depth, stop_depth=stop,
                          expected_total=float(value.sum()), found=int(outcome.sum()),
                          reviewed=len(reviewed_rows), calibration=(a, b), cleanlab_total=cleanlab_total,
                          prior_noise_rate=float(expit(logit(np.clip(prob, _EPS, 1 - _EPS)) + prior_offset).mean()))


def spot_check_rows(estimate: ReviewEstimate, reviewed_rows: np.ndarray, size: int, *, seed: int = 0) -> np.ndarray:
    """``size`` random unreviewed rows (positions) ranked below the stop line. Decisions at the top of the
    ranking say little about the tail, where most of the uncertainty about the total sits; a uniform
    sample there recalibrates the estimate without bias."""
    beyond = estimate.order[estimate.stop_depth:]
    candidates = beyond[~np.isin(beyond, reviewed_rows)]
    return np.sort(np.random.default_rng(seed).choice(candidates, size=min(size, len(candidates)), replace=False))


def label_error_probability(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1 − p_y: a model's probability that each given label is wrong."""
    return 1.0 - probabilities[np.arange(len(labels)), labels]


def cleanlab_issue_count(labels: np.ndarray, out_of_sample_probabilities: np.ndarray) -> int:
    """cleanlab's estimate of the number of label issues (a second opinion on the total)."""
    from cleanlab.count import num_label_issues

    return int(num_label_issues(labels, out_of_sample_probabilities))


def fit_noise_transitions(probabilities: np.ndarray, labels: np.ndarray, *, max_iterations: int = 1000,
                          tolerance: float = 1e-10) -> np.ndarray:
    """T[c, j] = P(given label j | true class c), the class-conditional noise that makes the given labels
    most likely under a model of the true class: argmax Σ_n log Σ_c p_n(c) T[c, y_n]. The objective is
    concave in T, so EM reaches the global maximum from any start. Only for a model that did not fit the
    given labels (θ̃): one trained on them already explains the noise, and T comes out ≈ identity."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    classes = probabilities.shape[1]
    order = np.argsort(labels, kind="stable")
    p, given = probabilities[order], np.asarray(labels)[order]
    present = np.unique(given)
    starts = np.searchsorted(given, present)
    transitions = np.full((classes, classes), 0.1 / max(classes - 1, 1))
    np.fill_diagonal(transitions, 0.9)
    previous = -np.inf
    for _ in range(max_iterations):
        joint = p * transitions[:, given].T  # p_n(c) T[c, y_n]
        evidence = np.maximum(joint.sum(axis=1, keepdims=True), 1e-300)
        log_likelihood = float(np.log(evidence).sum())
        posterior = joint / evidence
        counts = np.zeros((classes, classes))
        counts[:, present] = np.add.reduceat(posterior, starts, axis=0).T  # Σ over rows labeled j of P(true = c)
        transitions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-300)
        if log_likelihood - previous <= tolerance * len(given):
            break
        previous = log_likelihood
    return transitions


def noise_aware_error_probability(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """P(label wrong | image, given label) = 1 − p(y)T[y, y] / Σ_c p(c)T[c, y] with the fitted noise
    (:func:`fit_noise_transitions`). 1 − p_y is the special case T = "every label equally likely",
    which counts every doubt of the model as a label error."""
    transitions = fit_noise_transitions(probabilities, labels)
    rows = np.arange(len(labels))
    joint = np.asarray(probabilities, dtype=np.float64) * transitions[:, labels].T
    return 1.0 - joint[rows, labels] / np.maximum(joint.sum(axis=1), 1e-300)


def offset_matching_total(error_probability: np.ndarray, total: float) -> float:
    """The logit offset that makes the probabilities sum to ``total`` (e.g. cleanlab's count of issues)."""
    z = logit(np.clip(np.asarray(error_probability, dtype=np.float64), _EPS, 1 - _EPS))
    gap = lambda b: float(expit(z + b).sum() - total)  # noqa: E731 - increasing in b
    low, high = -40.0, 40.0
    if gap(low) >= 0 or gap(high) <= 0:
        return low if gap(low) >= 0 else high
    return float(brentq(gap, low, high, xtol=1e-9))


# Methods whose stored ``probabilities`` come from a model that did not fit the given training labels,
# best first: the validation minimum θ̃ (fine-tuned on the trusted set), then cleanlab's held-out folds.
VALIDATION_MINIMUM_SOURCES = ("fvm-loss", "fvm", "vm-loss", "vm")
PROBABILITY_SOURCES = (*VALIDATION_MINIMUM_SOURCES, "cleanlab")
# benchmarks/results/review-depth.md: the trained model's 1 − p_y put the total at 1.6× (digits) to 100×
# (CIFAR-10's real errors) the truth; it is the last resort, and says so.
TRAINED_MODEL_SOURCE = ("trained model (unreliable: it saw the labels, and counts its every doubt as an error; "
                        "measured 1.6× to 100× too many)")


def error_probability_source(results: Mapping[str, Any], labels: np.ndarray, trained_probabilities: np.ndarray,
                             *, trusted_validation: bool = True) -> tuple[str, np.ndarray, float]:
    """(source, P(label wrong) per row, logit offset to add before any decision) from the best stored
    probabilities of a run's results (each with an ``arrays`` dict), falling back to the trained model's.

    The given labels count as evidence: under θ̃, through the label noise that makes them likeliest
    (:func:`noise_aware_error_probability`, offset 0); under cleanlab's held-out model (trained on the
    noisy labels, so that fit finds no noise) by an offset to cleanlab's own count of issues; not at all
    under the trained model, which has no ground-truth-free correction.

    ``trusted_validation=False`` (a validation set carved from the noisy training data): θ̃ was fitted to
    labels as noisy as the ones it judges, and its noise fit finds (next to) none: on an own folder of
    303 images with 17 real errors it estimated 0.4. Only cleanlab's held-out folds, else the trained
    model (said unreliable), are used then.
    """
    for method in PROBABILITY_SOURCES if trusted_validation else ("cleanlab",):
        if method in results and "probabilities" in results[method].arrays:
            probabilities = results[method].arrays["probabilities"]
            if method in VALIDATION_MINIMUM_SOURCES:
                return method, noise_aware_error_probability(probabilities, labels), 0.0
            prob = label_error_probability(probabilities, labels)
            return method, prob, offset_matching_total(prob, cleanlab_issue_count(labels, probabilities))
    return TRAINED_MODEL_SOURCE, label_error_probability(trained_probabilities, labels), 0.0


@dataclass(frozen=True)
class ErrorPrior:
    """What a run's estimate starts from before any decision (the same for every ranking and decision,
    so a dashboard computes it once per run)."""

    source: str
    probability: np.ndarray  # P(label wrong) per row
    offset: float  # logit offset added before any decision
    cleanlab_total: int | None  # cleanlab's count of issues on its held-out probabilities, when it ran


def error_prior(results: Mapping[str, Any], labels: np.ndarray, trained_probabilities: np.ndarray, *,
                trusted_validation: bool = True) -> ErrorPrior:
    """The best probability source among a run's results (:func:`error_probability_source`) and cleanlab's count."""
    source, prob, offset = error_probability_source(results, labels, trained_probabilities,
                                                    trusted_validation=trusted_validation)
    cleanlab = results.get("cleanlab")
    cleanlab_total = (cleanlab_issue_count(labels, cleanlab.arrays["probabilities"])
                      if cleanlab is not None and "probabilities" in cleanlab.arrays else None)
    return ErrorPrior(source, prob, offset, cleanlab_total)


def review_estimate(results: Mapping[str, Any], ranked_by: str, labels: np.ndarray, trained_probabilities: np.ndarray,
                    *, reviewed_rows: np.ndarray | None = None, reviewed_is_error: np.ndarray | None = None,
                    threshold: float = 0.5, prior: ErrorPrior | None = None,
                    trusted_validation: bool = True) -> ReviewEstimate:
    """:func:`estimate_review_depth` for one scored run: the ranking of method ``ranked_by`` from the
    run's :func:`error_prior` (pass ``prior`` when it is already known)."""
    prior = prior if prior is not None else error_prior(results, labels, trained_probabilities,
                                                        trusted_validation=trusted_validation)
    estimate = estimate_review_depth(results[ranked_by].scores, prior.probability, reviewed_rows=reviewed_rows,
                                     reviewed_is_error=reviewed_is_error, threshold=threshold,
                                     cleanlab_total=prior.cleanlab_total, prior_offset=prior.offset)
    return replace(estimate, source=prior.source)


# ---------------------------------------------------------------------------------------------
# Guards against misuse: each returns a warning (never blocks), with a stable code.

@dataclass(frozen=True)
class Advice:
    """A non-blocking warning with a stable code (for tests and the UI) and a plain message."""

    code: str
    message: str


def _shared_images(first: Dataset, second: Dataset) -> int:
    """How many of ``second``'s images also appear in ``first``: compared by file content when both
    were read from files (nothing decoded: a frozen-backbone run reads each photo once, for its
    features), else by pixels, read batch by batch (never every image at once)."""
    if first.paths is None or second.paths is None or not (is_lazy(first.images) or is_lazy(second.images)):
        return len(_pixel_keys(first) & _pixel_keys(second))
    first_sizes, second_sizes = _file_sizes(first), _file_sizes(second)
    sizes = set(first_sizes.values()) & set(second_sizes.values())  # equal contents have equal sizes
    return len(_content_keys(first_sizes, sizes) & _content_keys(second_sizes, sizes))


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _file_sizes(dataset: Dataset) -> dict[Path, int]:
    """The size of each of the dataset's files that is still there."""
    folder = files_folder(dataset)
    sizes = {}
    for name in dataset.paths:
        with contextlib.suppress(OSError):  # gone since loading: not there to compare
            status = (folder / name).stat()
            if stat.S_ISREG(status.st_mode):
                sizes[folder / name] = status.st_size
    return sizes


def _content_keys(sizes: dict[Path, int], wanted: set[int]) -> set[bytes]:
    """Digests of the files whose size is in ``wanted``: only those can have a copy in the other set."""
    return {_digest(path.read_bytes()) for path, size in sizes.items() if size in wanted}


def _pixel_keys(dataset: Dataset) -> set[bytes]:
    keys = set()
    for _, images in batches(dataset.images, batch_size=inference_batch(dataset.image_shape, cap=4096)):
        keys.update(_digest(image.tobytes()) for image in images)
    return keys


def validation_warnings(train: Dataset, validation: Dataset | None, *, trusted: bool = True,
                        min_per_class: int = 5, reviewed_in_validation: np.ndarray | list[int] = ()) -> list[Advice]:
    """Warnings about the trusted validation set: overlap with training, size, missing classes, carve-out.

    ``reviewed_in_validation``: training indices a person reviewed and added to the validation set on
    purpose (closing the loop, docs/methods.md §4); their copies are not counted as an overlap."""
    if validation is None:
        return []
    found: list[Advice] = []
    moved = np.isin(train.index, np.asarray(reviewed_in_validation, dtype=np.int64))
    overlap = _shared_images(train.subset(~moved), validation)
    if overlap:
        found.append(Advice("validation-overlap", f"{overlap} validation images also appear in the training set; "
                                                    "a trusted validation set must be held out"))
    counts = np.bincount(validation.labels, minlength=validation.num_classes)
    missing = [validation.class_names[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        found.append(Advice("validation-missing-classes",
                              f"the validation set has no samples of class(es) {', '.join(missing)}"))
    small = [validation.class_names[c] for c in np.flatnonzero((counts > 0) & (counts < min_per_class))]
    if small:
        found.append(Advice("validation-small", f"the validation set has fewer than {min_per_class} samples of "
                                                  f"class(es) {', '.join(small)}; FVM needs a few per class"))
    if not trusted:
        found.append(Advice("validation-untrusted", "the validation set was carved out of the (noisy) training "
                                                      "data, so its labels are not trusted; FVM is less reliable"))
    return found


def cleaning_test_set_warnings(train: Dataset, test: Dataset | None) -> list[Advice]:
    """Warn when the set being cleaned is also the one test accuracy is reported on."""
    if test is None:
        return []
    shared = _shared_images(train, test)
    if shared:
        return [Advice("cleaning-test-set", f"{shared} test images are also in the set being cleaned; "
                                              "accuracy measured on them after cleaning is optimistic")]
    return []


def model_warnings(*, history: list[dict[str, float]], flagged_train_accuracy: float | None = None,
                   validation_accuracy: float | None = None, min_validation_accuracy: float = 0.7,
                   training_notes: list[str] | None = None) -> list[Advice]:
    """Warnings about the models: restarted after divergence, unconverged, memorized noise, weak
    validation model."""
    found = [Advice("training-restarted", note) for note in training_notes or []]
    if history:
        last = history[-1]
        previous = history[-2] if len(history) >= 2 else last
        if last["accuracy"] < 0.5 or previous["loss"] - last["loss"] > 0.1 * previous["loss"]:
            found.append(Advice("not-converged", f"the base model may not have converged (training accuracy "
                                                   f"{last['accuracy']:.2f}, loss {last['loss']:.3f} still falling); "
                                                   "train for more epochs"))
    if flagged_train_accuracy is not None and flagged_train_accuracy >= MEMORIZED_FLAGGED_ACCURACY:
        found.append(Advice("memorized", f"the base model fits {flagged_train_accuracy:.0%} of the flagged samples' "
                                         "given labels: it has memorized the noise, so scores taken at the trained "
                                         "model (loss, margin, TracIn) are unreliable; prefer VM/FVM or fewer epochs"))
    if validation_accuracy is not None and validation_accuracy < min_validation_accuracy:
        found.append(Advice("weak-validation-model", f"the validation model reaches only {validation_accuracy:.1%} "
                                                       "accuracy on the validation set; the FVM ranking is unreliable"))
    return found


def scoring_advice(train: Dataset, table, *, validation: Dataset | None, trusted: bool, info: dict,
                   history: list[dict[str, float]] | None = None, training_notes: list[str] | None = None,
                   flagged_fraction: float = 0.05, reviewed_in_validation: np.ndarray | list[int] = (),
                   uses_validation: bool = True) -> list[Advice]:
    """Every guard that applies to one scored run; ``table`` is the per-sample result table.

    ``uses_validation=False``: the method scored without the validation set (``loss``, ``if-last``…), so
    the warnings about that set are left out (``if-last --embeddings`` with a carved set warned that
    "FVM is less reliable").

    Memorization is judged on the top ``flagged_fraction`` of the ranking: if θ* still predicts the
    given label of almost all of them, it has fit the suspected noise. ``reviewed_in_validation``: see
    :func:`validation_warnings`.
    """
    flagged = table.nsmallest(max(1, int(len(table) * flagged_fraction)), "rank")
    flagged_accuracy = float((flagged["predicted_label"] == flagged["given_label"]).mean())
    finetune = [Advice("finetune-not-a-minimum", info["finetune_warning"])] if info.get("finetune_warning") else []
    about_validation = validation_warnings(train, validation, trusted=trusted,
                                           reviewed_in_validation=reviewed_in_validation) if uses_validation else []
    return about_validation + model_warnings(
        history=history or [], flagged_train_accuracy=flagged_accuracy,
        validation_accuracy=info.get("validation_accuracy"), training_notes=training_notes) + finetune

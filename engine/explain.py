"""The numbers behind the dashboard's views: why a sample was flagged, maps, curves, recovery.

All inputs are plain arrays aligned with dataset rows (scores: higher = more suspicious), so the
review pages can call these on what the workspace stored, without the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from engine.config import TrainConfig
from engine.data import Dataset
from engine.frozen import frozen_inputs
from engine.metrics import ranking
from engine.pipeline import apply_decisions
from engine.progress import Progress, no_progress
from engine.task import fit_task
from engine.training import evaluate, train

MAP_METHODS = ("pca", "tsne")


SIMILARITY_CHUNK_ROWS = 65_536  # pool rows turned to float64 at a time (a million-row pool is read in slices)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def cosine_similarities(query: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``pool`` (an array or a memory map) to ``query``, in float64,
    reading ``pool`` in slices."""
    unit = _unit(query)
    out = np.empty(len(pool))
    for lo in range(0, len(pool), SIMILARITY_CHUNK_ROWS):
        rows = np.asarray(pool[lo:lo + SIMILARITY_CHUNK_ROWS], dtype=np.float64)
        out[lo:lo + len(rows)] = (rows @ unit) / np.maximum(np.linalg.norm(rows, axis=1), 1e-12)
    return out


def nearest(query: np.ndarray, pool: np.ndarray, k: int, *,
            among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``pool`` most cosine-similar to one feature vector: ``(positions, similarities)``.

    ``among``: a boolean mask restricting the candidates.
    """
    return _most_similar(cosine_similarities(query, pool), k, among)


def _most_similar(similarity: np.ndarray, k: int, among: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    candidates = np.flatnonzero(among) if among is not None else np.arange(len(similarity))
    order = candidates[np.argsort(-similarity[candidates], kind="stable")][:k]
    return order, similarity[order]


@dataclass(frozen=True)
class Explanation:
    """Why a training row was flagged, as row positions (with cosine similarities) into each set."""

    validation: tuple[np.ndarray, np.ndarray]  # validation images most like it (any label)
    same_given: tuple[np.ndarray, np.ndarray]  # training images like it that carry its given label
    same_suggested: tuple[np.ndarray, np.ndarray]  # training images like it that carry the suggested label


def explain(position: int, *, features: np.ndarray, labels: np.ndarray, suggested: int,
            val_features: np.ndarray | None = None, k: int = 6) -> Explanation:
    """Nearest validation images, and the training images that pull towards the given label vs. the
    suggested one (nearest neighbours by the model's penultimate features, the sample itself excluded)."""
    others = np.ones(len(features), dtype=bool)
    others[position] = False
    query = features[position]
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0))
    validation = nearest(query, val_features, k) if val_features is not None and len(val_features) else empty
    similarity = cosine_similarities(query, features)  # once for both training lists
    return Explanation(validation,
                       _most_similar(similarity, k, others & (labels == labels[position])),
                       _most_similar(similarity, k, others & (labels == suggested)))


MAP_ROWS = 20_000  # points a feature map draws at most: a browser and PCA stay quick, the shape stays clear


def map_rows(n: int, *, limit: int = MAP_ROWS, seed: int = 0) -> np.ndarray:
    """The rows a feature map of ``n`` rows draws: all of them up to ``limit``, else ``limit`` drawn at
    random (seeded: the same map on every visit), in row order."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def feature_map(features: np.ndarray, *, method: str = "pca", seed: int = 0) -> np.ndarray:
    """A 2-D embedding of the model's features (N×2): PCA, or t-SNE (slower, for up to ~10k rows)."""
    from sklearn.decomposition import PCA

    features = np.asarray(features, dtype=np.float64)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(features)
    if method == "tsne":
        from sklearn.manifold import TSNE

        reduced = PCA(n_components=min(50, features.shape[1], len(features)), random_state=seed).fit_transform(features)
        return TSNE(n_components=2, init="pca", random_state=seed,
                    perplexity=min(30.0, max(5.0, (len(features) - 1) / 3))).fit_transform(reduced)
    raise ValueError(f"unknown map method {method!r}; valid: {', '.join(MAP_METHODS)}")


def class_confusion(given: np.ndarray, suggested: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts C×C: row = given label, column = suggested label."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(given, dtype=np.int64), np.asarray(suggested, dtype=np.int64)), 1)
    return counts


def detection_curves(scores: np.ndarray, is_noisy: np.ndarray) -> dict[str, pd.DataFrame]:
    """ROC (``fpr, tpr``), precision-recall (``recall, precision``) and errors found vs. inspected
    (``inspected, found``: label errors among the top-``inspected``) of one ranking."""
    is_noisy = np.asarray(is_noisy, dtype=bool)
    fpr, tpr, _ = roc_curve(is_noisy, scores)
    precision, recall, _ = precision_recall_curve(is_noisy, scores)
    found = np.concatenate([[0], np.cumsum(is_noisy[ranking(scores)])])
    return {"roc": pd.DataFrame({"fpr": fpr, "tpr": tpr}),
            "pr": pd.DataFrame({"recall": recall, "precision": precision}),
            "found": pd.DataFrame({"inspected": np.arange(len(found)), "found": found})}


def fix_top(dataset: Dataset, scores: np.ndarray, k: int, fix_labels: np.ndarray) -> pd.DataFrame:
    """Decisions (``index,action,new_label``) that relabel the top-``k`` rows to ``fix_labels``
    where it differs from the given label (a reviewer confirming the rest as correct)."""
    top = ranking(scores)[:k]
    change = top[fix_labels[top] != dataset.labels[top]]
    return pd.DataFrame({"index": dataset.index[change], "action": "relabel",
                         "new_label": np.asarray(fix_labels, dtype=np.int64)[change]})


def cleaning_curves(dataset: Dataset, test_set: Dataset, rankings: dict[str, tuple[np.ndarray, np.ndarray]], *,
                    depths: list[int], config: TrainConfig | None = None,
                    progress: Progress = no_progress) -> pd.DataFrame:
    """Test accuracy after fixing the top-k of each ranking, for each k in ``depths``.

    ``rankings``: name → (scores, labels a reviewer would fix to): the true labels when known
    (the oracle ranking is then ``flipped`` as scores), else the method's suggestions. Every point
    retrains with the same recipe and seed; identical decision sets are trained once.
    Returns ``curve, fixed, relabeled, accuracy``.
    """
    config, dataset, (test_set,) = frozen_inputs(config or TrainConfig(), dataset, test_set)
    task = fit_task(dataset)  # relabeling leaves the images (or features), hence the normalization, unchanged
    trained_for: dict[tuple, float] = {}
    rows = []
    jobs = [(name, k) for name in rankings for k in depths]
    for step, (name, k) in enumerate(jobs):
        scores, fix_labels = rankings[name]
        decisions = fix_top(dataset, scores, k, fix_labels)
        key = tuple(sorted(zip(decisions["index"].tolist(), decisions["new_label"].tolist(), strict=True)))
        if key not in trained_for:
            progress(step, len(jobs), f"cleaning curve: {name}, top {k}")
            model = train(apply_decisions(dataset, decisions), config, task=task)
            trained_for[key] = evaluate(model, test_set)
        rows.append({"curve": name, "fixed": k, "relabeled": len(decisions), "accuracy": trained_for[key]})
    progress(len(jobs), len(jobs), "cleaning curve: done")
    return pd.DataFrame(rows)

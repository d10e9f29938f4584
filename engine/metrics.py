"""Detection metrics and the one ranking function (higher score = more suspicious)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

DEPTH_FRACTIONS = (0.01, 0.02, 0.05, 0.10)


def ranking(scores: np.ndarray) -> np.ndarray:
    """Row positions from most to least suspicious; ties keep row order (stable)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The row positions of the ``k`` most suspicious samples, most suspicious first."""
    return ranking(scores)[:k]


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every row (1 = most suspicious)."""
    order = ranking(scores)
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.arange(1, len(order) + 1)
    return out


def precision_recall_at(scores: np.ndarray, is_noisy: np.ndarray, k: int) -> tuple[float, float]:
    """Precision and recall of the top ``k`` against the known noisy samples."""
    is_noisy = np.asarray(is_noisy, dtype=bool)
    k = max(1, min(int(k), len(scores)))
    hits = int(is_noisy[top_k(scores, k)].sum())
    return hits / k, hits / max(1, int(is_noisy.sum()))


def detection_metrics(scores: np.ndarray, is_noisy: np.ndarray) -> dict[str, float]:
    """AUROC, AP, precision/recall at k = #noisy, and precision/recall at 1/2/5/10% of N."""
    is_noisy = np.asarray(is_noisy, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if is_noisy.all() or not is_noisy.any():
        raise ValueError("detection metrics need both noisy and clean samples")
    n_noisy = int(is_noisy.sum())
    p_k, r_k = precision_recall_at(scores, is_noisy, n_noisy)
    out = {"auroc": float(roc_auc_score(is_noisy, scores)),
           "ap": float(average_precision_score(is_noisy, scores)),
           "precision_at_k": p_k, "recall_at_k": r_k, "k": n_noisy}
    for frac in DEPTH_FRACTIONS:
        p, r = precision_recall_at(scores, is_noisy, int(round(frac * len(scores))))
        pct = f"{round(frac * 100)}pct"
        out[f"precision_at_{pct}"], out[f"recall_at_{pct}"] = p, r
    return out

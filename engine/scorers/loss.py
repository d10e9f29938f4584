"""Baseline: the training loss at θ* (METHODS.md §1)."""

from __future__ import annotations

import numpy as np

from engine.scorers.base import Scorer, ScoringContext
from engine.scorers.registry import register


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy of integer labels under float64 logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return log_norm - z[np.arange(len(labels)), labels]


@register
class LossScorer(Scorer):
    name = "loss"
    description = "cross-entropy of the given label at the trained model"
    row_local = True

    def _score(self, context: ScoringContext):
        preds = context.predictions
        return cross_entropy(preds.logits, context.train.labels), preds.predicted, {}

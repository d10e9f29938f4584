"""Baseline: the training loss at θ* (docs/methods.md §1)."""

from __future__ import annotations

from engine.scorers.base import Scored, Scorer, ScoringContext
from engine.scorers.registry import register
from engine.task import cross_entropy


@register
class LossScorer(Scorer):
    name = "loss"
    description = "cross-entropy of the given label at the trained model"
    row_local = True

    def _score(self, context: ScoringContext):
        preds = context.predictions
        return Scored(cross_entropy(preds.logits, context.train.labels), preds.predicted)

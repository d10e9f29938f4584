"""Baseline: the logit margin of the best other class over the given label (docs/methods.md §1)."""

from __future__ import annotations

import numpy as np

from engine.scorers.base import Scored, Scorer, ScoringContext
from engine.scorers.registry import register


@register
class MarginScorer(Scorer):
    name = "margin"
    description = "max over other classes of logit_c - logit_y at the trained model"
    row_local = True

    def _score(self, context: ScoringContext):
        logits = context.predictions.logits
        rows = np.arange(len(logits))
        given = logits[rows, context.train.labels]
        others = logits.copy()
        others[rows, context.train.labels] = -np.inf
        return Scored(others.max(axis=1) - given, context.predictions.predicted)

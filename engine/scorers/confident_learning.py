"""Baseline: confident learning's self-confidence on K-fold out-of-sample probabilities.

The probabilities come from retraining the same recipe on K-1 folds; the ranking itself is the
``cleanlab`` package's (never re-implemented here), turned into suspicion as 1 − quality.
In a distributed run the folds are trained round-robin across the ranks (fold k on rank k mod K)
and the held-out probabilities all-reduced: each row is held out by exactly one fold.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from cleanlab.rank import get_label_quality_scores
from sklearn.model_selection import StratifiedKFold

from engine.errors import DataError
from engine.scorers.base import Scored, Scorer, ScoringContext
from engine.scorers.registry import register
from engine.stages import ARRAY
from engine.training import predict, train


@register
class ConfidentLearningScorer(Scorer):
    name = "cleanlab"
    description = "cleanlab self-confidence on K-fold cross-validated probabilities"
    suggestion = "the most likely class of cleanlab's held-out model (K-fold cross-validation)"

    @dataclass(frozen=True)
    class Settings:
        folds: int = 5  # cleanlab's own default for cross-validated probabilities

    def _prepare(self, context: ScoringContext) -> None:
        """K-fold held-out probabilities. A class smaller than K sits in fewer folds (its rows are still
        held out once each); K shrinks only to the largest class's size."""
        labels = context.train.labels
        counts = np.bincount(labels, minlength=context.train.num_classes)
        self.folds = min(self.settings.folds, int(counts.max()))
        if self.folds < 2:
            raise DataError(f"{context.train.source or 'training set'}: every class has a single sample; "
                            "cleanlab's cross-validation needs at least 2 samples of some class")
        small = np.flatnonzero((counts > 0) & (counts < self.folds))
        self.small_classes = [context.train.class_names[c] for c in small]
        folds = StratifiedKFold(self.folds, shuffle=True, random_state=context.trained.config.seed)
        self.pred_probs = np.zeros((len(labels), context.train.num_classes))
        base, distributed = context.trained.config, context.distributed
        with warnings.catch_warnings():  # scikit-learn warns of classes smaller than K; said in the info instead
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            splits = list(folds.split(np.zeros(len(labels)), labels))
        for k, (fit_rows, held_rows) in enumerate(splits):
            if k % distributed.world_size != distributed.rank:
                continue  # another rank's fold

            def fold_progress(done: int, total: int, message: str, k: int = k) -> None:
                context.progress(k * total + done, self.folds * total, f"cleanlab cross-validation: fold {k + 1}")

            def held_out_probabilities(k=k, fit_rows=fit_rows, held_rows=held_rows, fold_progress=fold_progress):
                fold = replace(base, model=context.trained.model_name, seed=base.seed + k + 1)
                fold_model = train(context.train.subset(fit_rows), fold, task=context.trained.task,
                                   progress=fold_progress)
                held = context.train.subset(held_rows).images
                return predict(fold_model.model, fold_model.task, held, fold_model.device).probabilities

            self.pred_probs[held_rows] = context.cached("cv-fold", (self.settings, self.folds, k),
                                                        held_out_probabilities, ARRAY,
                                                        label=str(k + 1))
        self.pred_probs = distributed.all_reduce_sum(torch.from_numpy(self.pred_probs)).numpy()

    def _score(self, context: ScoringContext):
        quality = get_label_quality_scores(context.train.labels, self.pred_probs, method="self_confidence")
        accuracy = float((self.pred_probs.argmax(1) == context.train.labels).mean())
        info = {"cross_validated_accuracy": accuracy, "folds": self.folds}
        if self.small_classes:
            info["classes_smaller_than_folds"] = self.small_classes
        if context.distributed.world_size > 1:  # the rank that trained each fold
            info["fold_ranks"] = [k % context.distributed.world_size for k in range(self.folds)]
        return Scored(1.0 - quality, self.pred_probs.argmax(1), info,
                      {"probabilities": self.pred_probs.astype(np.float32)})

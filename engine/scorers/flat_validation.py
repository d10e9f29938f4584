"""Flat-validation influence, VM and FVM (METHODS.md §4), and the plain loss at the validation minimum.

θ̃: the trained model fine-tuned on the trusted validation set (:mod:`engine.finetune`): plain SGD
for VM, SAM or LPF-SGD for FVM. Each training sample z is scored by
s(z) = g̃(z)ᵀ(H̃_val + λI)⁻¹g̃(z), g̃ its gradient at θ̃ under its given label and H̃_val the GGN of
the validation loss at θ̃ (exact last layer, or EK-FAC over the whole network): the second-order
change of the validation risk if z were up-weighted. The validation gradient is zero at θ̃, so
no first-order term appears. ``vm-loss`` / ``fvm-loss`` report the loss at θ̃ alone, beside them
(METHODS.md: the curvature must earn its place against it). Relabel suggestion: argmin over
candidate labels of s(z, c), or θ̃'s argmax for the loss scorers.

Distributed: every rank fine-tunes alike and takes rank 0's θ̃ (bit-identical across ranks), fits
the validation curvature on its shard of the validation rows (sums all-reduced) and scores its
shard of the training rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.curvature import DEFAULT_RELATIVE_DAMPING
from engine.errors import DataError, OptionError
from engine.finetune import FinetuneConfig, FinetunedModel, finetune
from engine.scorers.base import Scorer, ScoringContext
from engine.scorers.influence import check_damping, ekfac_influence, fit_ekfac, fit_last_layer, last_layer_influence
from engine.scorers.loss import cross_entropy
from engine.scorers.registry import register
from engine.stages import curvature_codec, finetuned_codec
from engine.training import predict

CURVATURES = ("last", "ekfac")
TRUSTED_VALIDATION_HELP = (
    "needs a trusted validation set: a small labeled set, kept apart from the training data, whose labels "
    "you have checked and vouch for (VM/FVM fine-tune the model on it and treat its labels as the truth). "
    "Pass one with --val PATH, or carve one out of the training data with --val-from-train FRACTION "
    "(its labels carry the training noise, so it is reported as untrusted)")


class _ValidationMinimumScorer(Scorer):
    """Fine-tunes θ* to θ̃ on the validation set in ``prepare``; subclasses score at θ̃."""

    requires_validation = True
    prepared_row_local = True

    @dataclass(frozen=True)
    class Settings:
        finetune: FinetuneConfig = FinetuneConfig()

    def _finetune(self, context: ScoringContext) -> FinetunedModel:
        if context.validation is None or len(context.validation) == 0:
            raise DataError(f"method {self.name!r} {TRUSTED_VALIDATION_HELP}")
        self.finetuned = context.cached(
            "finetune", self.settings.finetune,
            lambda: finetune(context.trained, context.validation, self.settings.finetune, progress=context.progress),
            finetuned_codec(context.trained), label=self.settings.finetune.optimizer)
        context.distributed.broadcast_module(self.finetuned.model)  # ranks agree even if kernels do not
        self.timings["finetune_seconds"] = self.finetuned.seconds
        return self.finetuned

    def _validation_info(self, context: ScoringContext) -> dict[str, Any]:
        return {"validation_size": len(context.validation), "validation_trusted": context.validation_trusted,
                **self.finetuned.summary()}


@register
class FVMLossScorer(_ValidationMinimumScorer):
    name = "fvm-loss"
    description = "cross-entropy of the given label at the flat validation minimum θ̃ (SAM fine-tune)"

    def _prepare(self, context: ScoringContext) -> None:
        self._finetune(context)

    def _score(self, context: ScoringContext):
        trained = context.trained
        preds = predict(self.finetuned.model, trained.task, context.train.images, trained.device)
        return (cross_entropy(preds.logits, context.train.labels), preds.predicted, self._validation_info(context),
                {"probabilities": preds.probabilities.astype(np.float32)})


@register
class VMLossScorer(FVMLossScorer):
    name = "vm-loss"
    description = "cross-entropy of the given label at the validation minimum θ̃ (plain SGD fine-tune)"

    @dataclass(frozen=True)
    class Settings:
        finetune: FinetuneConfig = FinetuneConfig(optimizer="sgd")


@register
class FVMScorer(_ValidationMinimumScorer):
    name = "fvm"
    description = "flat-validation influence: self-influence at a flat validation minimum with validation curvature"

    @dataclass(frozen=True)
    class Settings:
        finetune: FinetuneConfig = FinetuneConfig()  # SAM, ρ = 0.05
        curvature: str = "last"  # exact last-layer GGN, or ekfac (whole network)
        damping: float = DEFAULT_RELATIVE_DAMPING  # λ as a multiple of the mean curvature eigenvalue
        fisher: str = "exact"  # ekfac: exact GGN (C backward passes per batch) or one sampled label
        candidate_labels: bool = False  # ekfac: argmin over every label (C backward passes) instead of θ̃'s argmax
        batch_size: int = 256  # ekfac
        seed: int = 0  # ekfac, sampled Fisher labels

    def _prepare(self, context: ScoringContext) -> None:
        if self.settings.curvature not in CURVATURES:
            raise OptionError("curvature", self.settings.curvature, CURVATURES)
        check_damping(self.settings.damping)
        model = self._finetune(context).model
        trained, validation = context.trained, context.fitting_shard(context.validation)

        def fit_curvature():
            if self.settings.curvature == "last":
                fit = predict(model, trained.task, validation.images, trained.device)
                return fit_last_layer(model, fit, trained.device, self.settings.damping, context.distributed)
            return fit_ekfac(model, trained.task, validation, trained.device, self.settings, context.progress,
                             context.distributed)

        self.curvature = context.cached("curvature", (self.name, self.settings), fit_curvature,
                                        curvature_codec(model, trained.device), label=self.name)

    def _score(self, context: ScoringContext):
        trained, train = context.trained, context.train
        model = self.finetuned.model
        target = predict(model, trained.task, train.images, trained.device)
        if self.settings.curvature == "last":
            scores, suggested, info = last_layer_influence(self.curvature, target, train.labels)
        else:
            scores, suggested, info = ekfac_influence(self.curvature, trained.task, train.images, train.labels,
                                                      trained.device, self.settings, target.predicted,
                                                      context.progress)
        info = {"curvature": self.settings.curvature, **info, **self._validation_info(context),
                "suggestions_agree_with_argmax": float(np.mean(suggested == target.predicted))}
        return scores, suggested, info, {"probabilities": target.probabilities.astype(np.float32)}


@register
class VMScorer(FVMScorer):
    name = "vm"
    description = "validation-minimum influence: as fvm, but the fine-tune is plain SGD (no flatness)"

    @dataclass(frozen=True)
    class Settings(FVMScorer.Settings):
        finetune: FinetuneConfig = FinetuneConfig(optimizer="sgd")

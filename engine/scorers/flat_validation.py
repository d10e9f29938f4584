"""Flat-validation influence, VM and FVM (docs/methods.md §4), and the plain loss at the validation minimum.

θ̃: the trained model fine-tuned on the trusted validation set (:mod:`engine.finetune`): plain SGD
for VM, SAM or LPF-SGD for FVM, minimizing the mean validation cross-entropy plus the weight decay
(wd/2)·‖θ‖². Each training sample z is scored by s(z) = g̃(z)ᵀ(H̃_val + λI)⁻¹g̃(z): g̃ the gradient
of z's cross-entropy at θ̃ under its given label (no weight-decay term), H̃_val the GGN of the
mean validation cross-entropy at θ̃ (the head's, exact or EK-FAC, or EK-FAC over the whole
network; the weight decay's wd·I is not added, λ damps instead), λ = ``damping`` × H̃_val's mean
eigenvalue. That is the second-order change of the validation risk if z were up-weighted, *if*
the validation gradient is zero at θ̃, which is why no first-order term appears: the info reports
the head's validation-gradient norm at θ̃ (and at θ*, for scale) and warns when θ̃ ends with a
higher validation loss than θ* (it is then no minimum). ``vm-loss`` / ``fvm-loss`` report the loss
at θ̃ alone, beside them (docs/methods.md §4: the curvature must earn its place against it). Relabel
suggestion: argmin over candidate labels of s(z, c), or θ̃'s argmax for the loss scorers.

One θ̃ per fine-tune recipe and scoring run: ``vm`` and ``vm-loss`` (and ``fvm`` and ``fvm-loss``)
scored on one context fine-tune once (:meth:`ScoringContext.cached`).

Distributed: every rank fine-tunes alike and takes rank 0's θ̃ (bit-identical across ranks), fits
the validation curvature on its shard of the validation rows (sums all-reduced) and scores its
shard of the training rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.curvature import (
    HEAD_CURVATURES,
    EKFACSettings,
    curvature_from_state,
    ekfac_influence,
    fit_ekfac,
    fit_head_curvature,
    head_curvature_kind,
    head_influence,
)
from engine.errors import DataError, OptionError
from engine.finetune import FinetuneConfig, FinetunedModel, finetune
from engine.scorers.base import Scored, Scorer, ScoringContext
from engine.scorers.registry import register
from engine.stages import state_codec
from engine.task import cross_entropy
from engine.training import predict

CURVATURES = (*HEAD_CURVATURES, "ekfac")  # the head's exact or EK-FAC GGN, or EK-FAC over every layer
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

    def check_settings(self) -> None:
        self.settings.finetune.validate()

    def _finetune(self, context: ScoringContext) -> FinetunedModel:
        if context.validation is None or len(context.validation) == 0:
            raise DataError(f"method {self.name!r} {TRUSTED_VALIDATION_HELP}")
        trained = context.trained
        self.finetuned = context.cached(
            "finetune", self.settings.finetune,
            lambda: finetune(trained, context.validation, self.settings.finetune, progress=context.progress),
            state_codec(lambda state: FinetunedModel.from_state(state, trained.model)),
            label=self.settings.finetune.optimizer)
        context.distributed.broadcast_module(self.finetuned.model)  # ranks agree even if kernels do not
        self.timings["finetune_seconds"] = self.finetuned.seconds
        return self.finetuned

    def _validation_info(self, context: ScoringContext) -> dict[str, Any]:
        warning = self.finetuned.warning()
        return {"validation_size": len(context.validation), "validation_trusted": context.validation_trusted,
                **self.finetuned.summary(), **({"finetune_warning": warning} if warning else {})}


class _LossAtMinimumScorer(_ValidationMinimumScorer):
    """The cross-entropy of each row's given label at θ̃ (``vm-loss``, ``fvm-loss``)."""

    suggestion = "the most likely class of the validation-minimum model θ̃"

    def _prepare(self, context: ScoringContext) -> None:
        self._finetune(context)

    def _score(self, context: ScoringContext) -> Scored:
        trained = context.trained
        preds = predict(self.finetuned.model, trained.task, context.train.images, trained.device)
        return Scored(cross_entropy(preds.logits, context.train.labels), preds.predicted,
                      self._validation_info(context), {"probabilities": preds.probabilities.astype(np.float32)})


@register
class FVMLossScorer(_LossAtMinimumScorer):
    name = "fvm-loss"
    description = "cross-entropy of the given label at the flat validation minimum θ̃ (SAM fine-tune)"


@register
class VMLossScorer(_LossAtMinimumScorer):
    name = "vm-loss"
    description = "cross-entropy of the given label at the validation minimum θ̃ (plain SGD fine-tune)"

    @dataclass(frozen=True)
    class Settings:
        finetune: FinetuneConfig = FinetuneConfig(optimizer="sgd")


class _InfluenceAtMinimumScorer(_ValidationMinimumScorer):
    """Self-influence gᵀ(H̃_val + λI)⁻¹g at θ̃ with the validation curvature (``vm``, ``fvm``)."""

    suggestion = ("the label c with the lowest influence score s(z, c) at θ̃: the one under which the sample looks "
                  "least harmful, which need not be any model's most likely class")

    @dataclass(frozen=True)
    class Settings(EKFACSettings):
        # damping applies to every curvature; fisher, candidate_labels, batch_size and seed to ekfac.
        finetune: FinetuneConfig = FinetuneConfig()  # SAM, ρ = 0.05
        # The head's exact GGN (EK-FAC of the head above engine.curvature.MAX_EXACT_HEAD_DIM, said in
        # the info), ekfac-last (the head's EK-FAC), or ekfac (EK-FAC over the whole network).
        curvature: str = "last"

    def check_settings(self) -> None:
        super().check_settings()
        if self.settings.curvature not in CURVATURES:
            raise OptionError("curvature", self.settings.curvature, CURVATURES)
        self.settings.check_ekfac()

    def _prepare(self, context: ScoringContext) -> None:
        model = self._finetune(context).model
        trained, validation = context.trained, context.fitting_shard(context.validation)
        self.kind, self.note = head_curvature_kind(model, self.settings.curvature)

        def fit_curvature():
            if self.kind == "ekfac":
                return fit_ekfac(model, trained.task, validation, trained.device, self.settings, context.progress,
                                 context.distributed)
            fit = predict(model, trained.task, validation.images, trained.device)
            return fit_head_curvature(model, fit, trained.device, self.settings.damping, context.distributed,
                                      self.kind)

        self.curvature = context.cached("curvature", (self.name, self.settings), fit_curvature,
                                        state_codec(lambda state: curvature_from_state(state, model, trained.device)),
                                        label=self.name)

    def _score(self, context: ScoringContext) -> Scored:
        trained, train = context.trained, context.train
        model = self.finetuned.model
        target = predict(model, trained.task, train.images, trained.device)
        if self.kind == "ekfac":
            scores, suggested, info = ekfac_influence(self.curvature, trained.task, train.images, train.labels,
                                                      trained.device, self.settings, target.predicted,
                                                      context.progress)
        else:
            scores, suggested, info = head_influence(self.curvature, target, train.labels)
        info = {**info, **({"curvature_note": self.note} if self.note else {}), **self._validation_info(context),
                "suggestions_agree_with_argmax": float(np.mean(suggested == target.predicted))}
        return Scored(scores, suggested, info, {"probabilities": target.probabilities.astype(np.float32)})


@register
class FVMScorer(_InfluenceAtMinimumScorer):
    name = "fvm"
    description = "flat-validation influence: self-influence at a flat validation minimum with validation curvature"


@register
class VMScorer(_InfluenceAtMinimumScorer):
    name = "vm"
    description = "validation-minimum influence: as fvm, but the fine-tune is plain SGD (no flatness)"

    @dataclass(frozen=True)
    class Settings(_InfluenceAtMinimumScorer.Settings):
        finetune: FinetuneConfig = FinetuneConfig(optimizer="sgd")

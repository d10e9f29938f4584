"""TracIn self-influence (docs/methods.md §2): s(z) = Σ_t η_t ‖∇θ ℓ(z, θ_t)‖² over saved checkpoints.

Three scorers share this file: the last layer only from forward passes (``tracin-last``), the
whole network from one batched backward pass per checkpoint (``tracin``, via
:mod:`engine.per_sample`), and a dropout ensemble around the final model (``tracin-ensemble``):
as in the paper (seed 004), dropout on the activations (the outputs of the ReLUs and their kin; on a
lone head, its input features), or DropConnect on the weights.
A gradient norm has no per-label form that would rank candidate labels, so the suggested label is
the final model's argmax.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.errors import InfluenceLensError, OptionError
from engine.per_sample import NORM_METHODS, per_sample_grad_sq_norms, trainable_layers
from engine.progress import Progress
from engine.scorers.base import Scored, Scorer, ScoringContext
from engine.scorers.registry import register
from engine.task import Task
from engine.training import Checkpoint, TrainedModel, predict


def last_layer_sq_norms(model: nn.Module, task: Task, images: np.ndarray, labels: np.ndarray,
                        device: torch.device) -> np.ndarray:
    """‖∇ head ℓ‖² = ‖p − e_y‖² · (‖a‖² + 1 if the head has a bias): forward passes only."""
    preds = predict(model, task, images, device)
    residual = preds.probabilities
    residual[np.arange(len(labels)), labels] -= 1.0
    feature_sq = np.einsum("nd,nd->n", preds.features, preds.features, dtype=np.float64) + (model.head.bias is not None)
    return np.square(residual).sum(1) * feature_sq


def _checkpoints(trained: TrainedModel) -> list[Checkpoint]:
    if not trained.checkpoints:
        raise InfluenceLensError("TracIn needs the checkpoints saved during training, and this model has none")
    return trained.checkpoints


def _stage(progress: Progress, stage: str, part: int, parts: int) -> Progress:
    """Map one part's progress onto a single bar for the whole stage."""
    def report(done: int, total: int, message: str) -> None:
        progress(part * total + done, parts * total, stage)
    return report


def _layer_names(model: nn.Module) -> list[str]:
    names = {module: name for name, module in model.named_modules()}
    return [names[layer] for layer in trainable_layers(model)]


def _sum_over_checkpoints(trained: TrainedModel, weight_by_learning_rate: bool, squared_norms) -> np.ndarray:
    """TracIn-CP: Σ_t w_t · squared_norms(model at checkpoint t, t, number of checkpoints), w_t the sum
    of the learning rates of the steps since the previous checkpoint (each checkpoint stands for them)."""
    checkpoints = _checkpoints(trained)
    total = 0.0
    for j, checkpoint in enumerate(checkpoints):
        weight = checkpoint.step_weight if weight_by_learning_rate else 1.0
        total = total + weight * squared_norms(trained.model_at(checkpoint), j, len(checkpoints))
    return np.asarray(total, dtype=np.float64)


def _checkpoint_info(checkpoints: list[Checkpoint]) -> list[dict[str, float]]:
    # The mean rate of the steps the checkpoint stands for (its weight is that × steps).
    return [{"epoch": c.epoch, "mean_learning_rate": c.mean_learning_rate, "steps": c.steps} for c in checkpoints]


@register
class TracInLastScorer(Scorer):
    name = "tracin-last"
    description = "TracIn self-influence of the final linear layer over the checkpoints (forward passes only)"
    row_local = True

    @dataclass(frozen=True)
    class Settings:
        weight_by_learning_rate: bool = True  # TracIn-CP: Σ η of the steps each checkpoint stands for

    def _score(self, context: ScoringContext) -> Scored:
        trained, train = context.trained, context.train

        def head_norms(model: nn.Module, j: int, count: int) -> np.ndarray:
            norms = last_layer_sq_norms(model, trained.task, train.images, train.labels, trained.device)
            context.progress(j + 1, count, "tracin-last")
            return norms

        scores = _sum_over_checkpoints(trained, self.settings.weight_by_learning_rate, head_norms)
        info = {"layers": ["head"], "checkpoints": _checkpoint_info(trained.checkpoints)}
        return Scored(scores, context.predictions.predicted, info)


@register
class TracInScorer(Scorer):
    name = "tracin"
    description = "TracIn self-influence of the whole network over the checkpoints (one batched backward each)"
    row_local = True

    @dataclass(frozen=True)
    class Settings:
        weight_by_learning_rate: bool = True  # TracIn-CP: Σ η of the steps each checkpoint stands for
        batch_size: int = 256  # rows per forward/backward; memory is about a training step's at this size
        norm_method: str = "auto"  # per layer the cheaper of ghost / explicit norm (docs/methods.md §2)

    def check_settings(self) -> None:
        if self.settings.norm_method not in NORM_METHODS:
            raise OptionError("norm_method", self.settings.norm_method, NORM_METHODS)

    def _score(self, context: ScoringContext) -> Scored:
        trained, train = context.trained, context.train

        def all_layer_norms(model: nn.Module, j: int, count: int) -> np.ndarray:
            return per_sample_grad_sq_norms(model, trained.task, train.images, train.labels, trained.device,
                                            batch_size=self.settings.batch_size, norm_method=self.settings.norm_method,
                                            progress=_stage(context.progress, "tracin", j, count))

        scores = _sum_over_checkpoints(trained, self.settings.weight_by_learning_rate, all_layer_norms)
        info = {"layers": _layer_names(trained.model), "checkpoints": _checkpoint_info(trained.checkpoints)}
        return Scored(scores, context.predictions.predicted, info)


ENSEMBLE_DROPOUTS = ("activation", "weights")


# The activation modules whose outputs the paper's ensemble drops (a residual block ends in one: its
# output, the tensor that both the next block's convolution and its identity shortcut read, is dropped
# once, with one mask).
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Tanh)


def activation_dropout_member(model: nn.Module, rate: float, generator: torch.Generator, *,
                              head_input: bool = False) -> nn.Module:
    """A copy of ``model`` (eval mode) whose activations pass through a dropout mask: the output of
    every activation module (:data:`ACTIVATIONS`), and with ``head_input`` the head's input too (a
    lone head on frozen features, whose input features are the backbone's activations). Each entry is
    kept with probability 1 − rate and rescaled by 1/(1 − rate), as dropout does in training.

    One mask per member and activation (per module and per-sample shape: a module called twice on
    one shape shares it), shared by every sample, drawn from ``generator`` at the member's first
    forward pass in the order the activations are computed: a member is one fixed network, so its
    scores do not depend on the batch size or the order of the rows.
    """
    member = copy.deepcopy(model).eval()
    masks: dict[tuple[nn.Module, tuple[int, ...]], torch.Tensor] = {}

    def drop(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        key = (module, tuple(x.shape[1:]))
        if key not in masks:
            keep = torch.rand(x.shape[1:], generator=generator) >= rate
            masks[key] = keep.to(x.device, x.dtype) / (1.0 - rate)
        return x * masks[key]

    for module in member.modules():
        if isinstance(module, ACTIVATIONS):
            module.register_forward_hook(lambda module, inputs, output: drop(module, output))
    if head_input:
        member.head.register_forward_pre_hook(lambda module, inputs: (drop(module, inputs[0]), *inputs[1:]))
    return member


def has_activations(model: nn.Module) -> bool:
    return any(isinstance(m, ACTIVATIONS) for m in model.modules())


def _member_head_sq_norms(member: nn.Module, task: Task, images: np.ndarray, labels: np.ndarray,
                          device: torch.device) -> np.ndarray:
    """``last_layer_sq_norms`` of a member whose head input may pass through a dropout hook: the head
    gradient is (p − e_y) ⊗ (the head's actual input)."""
    captured = []

    def capture(_, inputs):
        captured.append(inputs[0].detach())

    handle = member.head.register_forward_pre_hook(capture)
    try:
        preds = predict(member, task, images, device)
    finally:
        handle.remove()
    features = torch.cat(captured).double().cpu().numpy()
    residual = preds.probabilities
    residual[np.arange(len(labels)), labels] -= 1.0
    return np.square(residual).sum(1) * (np.square(features).sum(1) + (member.head.bias is not None))


def dropout_member(model: nn.Module, rate: float, generator: torch.Generator) -> nn.Module:
    """A copy of ``model`` (eval mode) with each Linear/Conv2d weight entry zeroed with probability ``rate``
    (DropConnect).

    Parameter dropout, no 1/(1 − rate) rescaling (rate ≤ 1% changes the scale by ≤ 1%). Biases
    and BatchNorm are left alone: zeroing a BatchNorm scale would remove a whole channel, a far
    larger perturbation than the rate says.
    """
    member = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in member.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                keep = torch.rand(module.weight.shape, generator=generator) >= rate
                module.weight.mul_(keep.to(module.weight.device, module.weight.dtype))
    return member


@register
class TracInEnsembleScorer(Scorer):
    name = "tracin-ensemble"
    description = "squared gradient norm summed over dropout copies of the final model (activation dropout)"
    row_local = True

    @dataclass(frozen=True)
    class Settings:
        members: int = 5  # member 0 is the final model itself; more members, less variance, linear cost
        max_dropout: float = 0.01  # member k ≥ 1 drops at a rate drawn from U(0, max_dropout)
        # activation: the paper's dropout on the activations (on a lone head: its input features);
        # weights: DropConnect
        # (weight entries zeroed, no rescaling), kept to compare against it.
        dropout: str = "activation"
        seed: int = 0  # rates and masks
        last_layer_only: bool = False  # True: each member's head gradient only (forward passes only)
        batch_size: int = 256

    def check_settings(self) -> None:
        settings = self.settings
        if settings.members < 1:
            raise OptionError("members", settings.members, ["a positive integer"])
        if not 0.0 <= settings.max_dropout < 1.0:
            raise OptionError("max_dropout", settings.max_dropout, ["a rate in [0, 1)"])
        if settings.dropout not in ENSEMBLE_DROPOUTS:
            raise OptionError("dropout", settings.dropout, ENSEMBLE_DROPOUTS)

    def _score(self, context: ScoringContext) -> Scored:
        settings = self.settings
        trained, train = context.trained, context.train
        rates = np.concatenate([[0.0], np.random.default_rng(settings.seed).uniform(0, settings.max_dropout,
                                                                                    settings.members - 1)])
        generator = torch.Generator().manual_seed(settings.seed)
        # A lone head on frozen features (or a network without activation modules) has no hidden
        # activation: its input features take the dropout, else every member would be the final model.
        head_input = context.head_only or not has_activations(trained.model)
        scores = np.zeros(len(train))
        for k, rate in enumerate(rates):
            if settings.dropout == "activation":
                member = activation_dropout_member(trained.model, float(rate), generator, head_input=head_input)
            else:
                member = dropout_member(trained.model, float(rate), generator)
            stage = _stage(context.progress, "tracin-ensemble", k, len(rates))
            if settings.last_layer_only:
                scores += _member_head_sq_norms(member, trained.task, train.images, train.labels, trained.device)
                stage(1, 1, "")
            else:
                scores += per_sample_grad_sq_norms(member, trained.task, train.images, train.labels, trained.device,
                                                   batch_size=settings.batch_size, progress=stage)
        info: dict[str, Any] = {"layers": ["head"] if settings.last_layer_only else _layer_names(trained.model),
                                "dropout": settings.dropout, "dropout_rates": [round(float(r), 6) for r in rates]}
        if settings.dropout == "activation":
            info["dropped"] = "the head's input features" if head_input and not has_activations(trained.model) else \
                "activation outputs" + (" and the head's input features" if head_input else "")
        return Scored(scores, context.predictions.predicted, info)

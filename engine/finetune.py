"""Fine-tune a copy of the trained model to a minimum θ̃ of the trusted validation risk (docs/methods.md §4).

VM uses plain SGD; FVM a flat minimum, with SAM (sharpness-aware: the gradient is taken at the
worst point within ρ) or LPF-SGD (Bisla et al. 2022, M = 1: the gradient is taken at a Gaussian
perturbation of every parameter, std γ·‖filter‖ per output filter of a weight, γ·‖p‖ for a 1-D
parameter such as a bias or a BatchNorm scale, as in the paper's code). All three on top of SGD
with momentum and weight decay on a warm-up + cosine schedule that ends at rate 0, where the
validation loss has plateaued (the summary reports its relative change over the last epochs).
The three see the same batches in the same order: the perturbation noise has its own generator.

What θ̃ minimizes is the mean eval-mode validation cross-entropy plus the weight decay
(wd/2)·‖θ‖² (SGD's ``weight_decay``): θ̃ is a minimum of that objective, not of the loss alone.
The summary reports how close: the norm of the head's gradient of the validation loss at θ̃, with
and without the weight-decay term, and whether the loss ended above where θ* started.

The network stays in **eval mode** throughout: BatchNorm normalizes with the running statistics
of the training data and they do not drift towards the small validation set (its affine
parameters still train). So the function being minimized is exactly the eval-mode validation
loss, the one whose curvature VM / FVM fit at θ̃ and under which the training samples are scored.
No augmentation either, for the same reason: θ̃ is a minimum of the loss on the images as given.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.data import Dataset
from engine.errors import OptionError, TrainingError
from engine.models import is_rgb_32px_or_more
from engine.progress import Progress, no_progress
from engine.training import TrainedModel

FINETUNE_OPTIMIZERS = ("sgd", "sam", "lpf")
MAX_BACKTRACKS = 3  # learning-rate thirds tried after a run that ends above the starting loss


@dataclass(frozen=True)
class FinetuneRecipe:
    """The per-architecture and per-input part of the fine-tune: what suits a small CNN on small
    grayscale digits stops short on 32 px colour photos and overshoots a ResNet-18 in eval mode, and
    LPF-SGD's γ differs by network scale. ``why`` is reported in the scorer's info."""

    epochs: int
    learning_rate: float
    gamma: float
    why: str


RECIPES: dict[str, FinetuneRecipe] = {
    # Measured on the sample digits (benchmarks/influence_settings.py): lr 0.01 overshoots in eval
    # mode, 0.001 stops short; 30 epochs reach the plateau. γ = 0.001: LPF-SGD's MNIST-scale value.
    "small-cnn": FinetuneRecipe(epochs=30, learning_rate=0.003, gamma=0.001, why=(
        "small CNN on grayscale or under-32-px images: lr 0.01 overshoots on the digits, 0.001 stops short")),
    # benchmarks/results/flagship-variants.md (CIFAR-10, 4k images, 20% noise, one θ* per setting):
    # lr 0.01 instead of 0.003 brings θ̃ closer to the validation minimum and ranks better,
    # vm-loss AUROC 0.881 → 0.887 (symmetric) and 0.875 → 0.889 (pair), fvm 0.844 → 0.848 and
    # 0.821 → 0.834. Only measured on 32 px RGB, so grayscale (MNIST's 28 px) keeps 0.003.
    "small-cnn-rgb32": FinetuneRecipe(epochs=30, learning_rate=0.01, gamma=0.001, why=(
        "small CNN on colour images of 32 px or more: lr 0.01 ranked better than 0.003 on CIFAR-10 "
        "(benchmarks/results/flagship-variants.md)")),
    # γ = 0.002: LPF-SGD's value for CIFAR-scale ResNets (docs/methods.md §4). lr and epochs are NOT yet
    # measured here: a third of the small CNN's rate (eval-mode BatchNorm in 20 layers is sharper;
    # the backtracking divides it further if a run ends above θ*'s loss) and half the epochs (5k
    # validation images give ~80 steps an epoch, not ~5). benchmarks/gpu_check.sh reports the plateau.
    "resnet18": FinetuneRecipe(epochs=15, learning_rate=0.001, gamma=0.002, why=(
        "ResNet-18, and any architecture without its own recipe: a third of the small CNN's digits rate "
        "(not yet measured)")),
    # The lone linear head on frozen backbone features (engine.frozen, HEAD_MODEL): a convex problem
    # without BatchNorm, so nothing in it sharpens in eval mode; the validation set gives few steps an
    # epoch. NOT yet measured: the trainer's own head rate (0.05) would overshoot a minimum it starts
    # near, the ResNet's 0.001 over 15 epochs barely moves; 0.01 over 30 epochs sits between, and the
    # backtracking divides it if a run ends above θ*'s loss.
    # The head alone on frozen features: the values its measured figures were taken with (the frozen rows of
    # benchmarks/results/own-model.md and the real-data comparisons, when the head fell back to ResNet-18's
    # recipe). Not tuned for the head: a convex problem without BatchNorm may take a larger rate.
    "linear": FinetuneRecipe(epochs=15, learning_rate=0.001, gamma=0.002, why=(
        "the linear head alone on frozen features: the values the frozen-backbone figures were measured with "
        "(benchmarks/results/own-model.md); not tuned for the head")),
}
DEFAULT_RECIPE = "resnet18"  # other architectures (deep, with BatchNorm) start from the ResNet's
RECIPE_FIELDS = ("epochs", "learning_rate", "gamma")  # what a recipe fills in where the config leaves None


def choose_recipe(model_name: str, image_shape: tuple[int, ...]) -> str:
    """The :data:`RECIPES` entry for an architecture and one sample's shape (H×W grayscale, H×W×C,
    or D on feature rows): the one place a fine-tune recipe is chosen."""
    if model_name == "small-cnn" and is_rgb_32px_or_more(image_shape):
        return "small-cnn-rgb32"
    return model_name if model_name in RECIPES else DEFAULT_RECIPE


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning recipe. ``epochs``, ``learning_rate`` and ``gamma`` left None come from the
    :data:`RECIPES` entry that :func:`choose_recipe` picks for the model and its input (:meth:`with_recipe`)."""

    optimizer: str = "sam"  # sgd (VM), sam or lpf (FVM)
    epochs: int | None = None  # the cosine schedule ends at rate 0, where the loss has plateaued (``plateau``)
    learning_rate: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4  # as in training (docs/methods.md §4)
    batch_size: int = 64
    warmup_epochs: int = 2  # linear warm-up before the cosine: momentum transients at full rate overshoot
    rho: float = 0.05  # SAM neighbourhood radius (the SAM paper's default for SGD)
    gamma: float | None = None  # LPF-SGD noise, relative to each filter's (or 1-D parameter's) norm
    seed: int = 0

    def with_recipe(self, recipe: str) -> FinetuneConfig:
        """This config with its unset values taken from ``RECIPES[recipe]``: values set here win."""
        return replace(self, **{name: getattr(RECIPES[recipe], name) for name in RECIPE_FIELDS
                                if getattr(self, name) is None})

    def validate(self) -> FinetuneConfig:
        if self.optimizer not in FINETUNE_OPTIMIZERS:
            raise OptionError("optimizer", self.optimizer, FINETUNE_OPTIMIZERS)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise OptionError(name, value, ["a positive integer"])
        for name in ("learning_rate", "rho", "gamma", "weight_decay", "warmup_epochs"):
            value = getattr(self, name)
            if value is not None and (not value >= 0 or (name == "learning_rate" and value == 0)):
                raise OptionError(name, value, ["a positive number"])
        return self


@dataclass
class FinetunedModel:
    """θ̃ (eval mode) with its validation accuracy and loss, before and after, the epochs run, and
    how far from a stationary point its head is."""

    model: nn.Module
    validation_accuracy: float
    validation_loss: float
    initial_validation_accuracy: float
    initial_validation_loss: float
    learning_rate: float  # the rate that was used (after any backtracking)
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    head_gradient_norm: float = float("nan")  # ‖∇_head L_val(θ̃)‖, the mean validation loss alone
    head_objective_gradient_norm: float = float("nan")  # ‖∇_head (L_val + wd/2‖θ‖²)‖: 0 at a minimum
    initial_head_gradient_norm: float = float("nan")  # ‖∇_head L_val(θ*)‖, for scale
    recipe: str = ""  # the RECIPES entry that filled the unset values
    recipe_why: str = ""  # why that one, and which values the settings set themselves

    @property
    def worse_than_start(self) -> bool:
        """θ̃ ends with a higher validation loss than θ* had: it is no minimum of the validation risk."""
        return self.validation_loss > self.initial_validation_loss

    def warning(self) -> str | None:
        """A plain sentence when θ̃ is not the validation minimum the VM / FVM scores assume."""
        if not self.worse_than_start:
            return None
        return (f"the model fine-tuned on the validation set ends with a higher validation loss "
                f"({self.validation_loss:.4f}) than the trained model had ({self.initial_validation_loss:.4f}): it "
                "is not a validation minimum, so VM/FVM scores are taken at an arbitrary point; the trained model may "
                "already sit at the validation minimum, or the fine-tuning learning rate is too high")

    def to_state(self) -> dict:
        return {"state": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
                **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}}

    @classmethod
    def from_state(cls, state: dict, like: nn.Module) -> FinetunedModel:
        """θ̃ loaded into a copy of ``like`` (the trained model: the same architecture)."""
        state = dict(state)
        model = copy.deepcopy(like)
        model.load_state_dict(state.pop("state"))
        return cls(model.eval(), **state)

    @property
    def plateau(self) -> float:
        """Relative fall of the validation loss over the last 3 epochs (≈ 0 once it has plateaued)."""
        losses = [h["loss"] for h in self.history]
        before = losses[max(0, len(losses) - 4)]
        return (before - losses[-1]) / before if before > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"validation_accuracy": self.validation_accuracy, "validation_loss": self.validation_loss,
                "validation_accuracy_before": self.initial_validation_accuracy,
                "validation_loss_before": self.initial_validation_loss, "finetune_epochs": self.epochs,
                "finetune_learning_rate": self.learning_rate, "finetune_plateau": self.plateau,
                "head_gradient_norm": self.head_gradient_norm,
                "head_objective_gradient_norm": self.head_objective_gradient_norm,
                "head_gradient_norm_before": self.initial_head_gradient_norm,
                "finetune_worse_than_start": self.worse_than_start,
                "finetune_recipe": self.recipe, "finetune_recipe_why": self.recipe_why}


@torch.no_grad()
def _evaluate(model: nn.Module, trained: TrainedModel, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean loss and accuracy on the whole validation set, eval mode."""
    loss, correct = 0.0, 0
    for lo in range(0, len(x), 512):
        logits = model(x[lo:lo + 512])
        loss += float(trained.task.loss(logits, y[lo:lo + 512], reduction="sum"))
        correct += int((logits.argmax(1) == y[lo:lo + 512]).sum())
    return loss / len(x), correct / len(x)


def head_gradient_norms(model: nn.Module, trained: TrainedModel, x: torch.Tensor, y: torch.Tensor,
                        weight_decay: float) -> tuple[float, float]:
    """‖∇_head L_val‖ and ‖∇_head (L_val + wd/2‖θ‖²)‖ at ``model`` (eval mode, the whole set)."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for p in head]
    for lo in range(0, len(x), 512):
        loss = trained.task.loss(model(x[lo:lo + 512]), y[lo:lo + 512], reduction="sum") / len(x)
        for total, g in zip(grads, torch.autograd.grad(loss, head), strict=True):
            total += g
    plain = torch.sqrt(sum(g.double().square().sum() for g in grads))
    objective = torch.sqrt(sum((g + weight_decay * p.detach()).double().square().sum()
                               for g, p in zip(grads, head, strict=True)))
    return float(plain), float(objective)


def _perturbation_scale(p: torch.Tensor, gamma: float) -> torch.Tensor:
    """LPF-SGD's noise std: γ·‖filter‖ per output filter of a weight, γ·‖p‖ for a 1-D parameter."""
    if p.ndim > 1:
        return gamma * p.flatten(1).norm(dim=1).view(-1, *[1] * (p.ndim - 1))
    return gamma * p.norm()


def _perturbed_gradient(model: nn.Module, loss_fn, config: FinetuneConfig, noise: torch.Generator) -> None:
    """Leave in ``.grad`` the gradient at the SAM / LPF perturbation of the weights (weights restored);
    LPF draws its noise from ``noise``, never from the generator of the batch order."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sam":
        loss_fn().backward()
    with torch.no_grad():
        if config.optimizer == "sam":
            norm = torch.sqrt(sum(p.grad.square().sum() for p in params if p.grad is not None))
            shifts = [config.rho * p.grad / (norm + 1e-12) if p.grad is not None else None for p in params]
        else:  # lpf: every parameter, Gaussian noise with std γ·norm
            shifts = [torch.randn(p.shape, generator=noise).to(p) * _perturbation_scale(p, config.gamma)
                      for p in params]
        for p, shift in zip(params, shifts, strict=True):
            if shift is not None:
                p.add_(shift)
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    with torch.no_grad():
        for p, shift in zip(params, shifts, strict=True):
            if shift is not None:
                p.sub_(shift)


def finetune(trained: TrainedModel, validation: Dataset, config: FinetuneConfig = FinetuneConfig(), *,
             progress: Progress = no_progress) -> FinetunedModel:
    """A copy of ``trained.model`` fine-tuned on ``validation`` (the original is left untouched).

    In eval mode the loss is far sharper than in train mode (BatchNorm no longer undoes a change
    of scale), so a rate that suits one network overshoots on another: a run that ends above the
    starting validation loss is repeated at a third of the rate, up to ``MAX_BACKTRACKS`` times.
    If none ends below it (θ* may already sit at the validation minimum), the attempt with the
    lowest final loss is kept; ``validation_loss`` against ``initial_validation_loss`` shows it.
    """
    config = config.validate()
    recipe = choose_recipe(trained.model_name, validation.image_shape)
    explicit = [name for name in RECIPE_FIELDS if getattr(config, name) is not None]
    why = RECIPES[recipe].why + (f"; set in the settings instead: {', '.join(explicit)}" if explicit else "")
    config = config.with_recipe(recipe)
    start = time.perf_counter()
    device, task = trained.device, trained.task
    x = task.inputs(validation.images, device)
    y = torch.as_tensor(validation.labels, device=device)
    initial_loss, initial_accuracy = _evaluate(trained.model.eval(), trained, x, y)
    initial_gradient, _ = head_gradient_norms(trained.model, trained, x, y, config.weight_decay)
    attempts = []
    for attempt in range(MAX_BACKTRACKS + 1):
        rate = config.learning_rate / 3**attempt
        model = copy.deepcopy(trained.model).eval()
        history = _descend(model, trained, x, y, replace(config, learning_rate=rate), progress)
        attempts.append((history[-1]["loss"], attempt, rate, model, history))
        if history[-1]["loss"] <= initial_loss:
            break
    loss, _, rate, model, history = min(attempts, key=lambda a: a[:2])
    if not np.isfinite(loss):
        raise TrainingError(f"fine-tuning on the validation set diverged even at learning rate {rate:.2g}; "
                            "lower the fine-tuning learning rate")
    progress(config.epochs, config.epochs, "fine-tuning on the validation set")
    gradient, objective_gradient = head_gradient_norms(model, trained, x, y, config.weight_decay)
    return FinetunedModel(model, history[-1]["accuracy"], loss, initial_accuracy, initial_loss, rate, len(history),
                          time.perf_counter() - start, history, gradient, objective_gradient, initial_gradient,
                          recipe, why)


def _descend(model: nn.Module, trained: TrainedModel, x: torch.Tensor, y: torch.Tensor, config: FinetuneConfig,
             progress: Progress) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place over the whole warm-up + cosine schedule; the per-epoch history."""
    n = len(x)
    steps_per_epoch = -(-n // config.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / total)))
    generator = torch.Generator().manual_seed(config.seed)  # batch order: the same for sgd, sam and lpf
    noise = torch.Generator().manual_seed(config.seed + 1)  # lpf's perturbations
    history = []
    for epoch in range(1, config.epochs + 1):
        perm = torch.randperm(n, generator=generator).to(x.device)
        for lo in range(0, n, config.batch_size):
            idx = perm[lo:lo + config.batch_size]

            def batch_loss(idx=idx):
                return trained.task.loss(model(x[idx]), y[idx])

            optimizer.zero_grad(set_to_none=True)
            if config.optimizer == "sgd":
                batch_loss().backward()
            else:
                _perturbed_gradient(model, batch_loss, config, noise)
            optimizer.step()
            schedule.step()
        loss, accuracy = _evaluate(model, trained, x, y)
        history.append({"epoch": epoch, "loss": loss, "accuracy": accuracy, "learning_rate": config.learning_rate})
        progress(epoch, config.epochs, "fine-tuning on the validation set")
        if not np.isfinite(loss):
            history[-1]["loss"] = float("inf")  # diverged: the caller retries at a lower rate
            break
    return history

"""Fine-tune a copy of the trained model to a minimum θ̃ of the trusted validation risk (METHODS.md §4).

VM uses plain SGD; FVM a flat minimum, with SAM (sharpness-aware: the gradient is taken at the
worst point within ρ) or LPF-SGD (the gradient is taken at a Gaussian perturbation of every
Linear/Conv filter with std γ·‖filter‖, one sample per step). Both on top of SGD with momentum,
weight decay and a small learning rate on a warm-up + cosine schedule that ends at rate 0, where
the validation loss has plateaued (the summary reports its relative change over the last epochs).

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
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from engine.data import Dataset
from engine.errors import OptionError, TrainingError
from engine.progress import Progress, no_progress
from engine.training import TrainedModel

FINETUNE_OPTIMIZERS = ("sgd", "sam", "lpf")
MAX_BACKTRACKS = 3  # learning-rate thirds tried after a run that ends above the starting loss


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning recipe; the defaults were chosen on the sample digits (see the benchmark)."""

    optimizer: str = "sam"  # sgd (VM), sam or lpf (FVM)
    epochs: int = 30  # the cosine schedule ends at rate 0, where the loss has plateaued (see ``plateau``)
    learning_rate: float = 0.003  # digits: 0.01 overshoots in eval mode, 0.001 stops short (benchmark)
    momentum: float = 0.9
    weight_decay: float = 5e-4  # as in training (METHODS.md §4)
    batch_size: int = 64
    warmup_epochs: int = 2  # linear warm-up before the cosine: momentum transients at full rate overshoot
    rho: float = 0.05  # SAM neighbourhood radius (the SAM paper's default for SGD)
    gamma: float = 0.001  # LPF-SGD noise per filter, relative to its norm (MNIST-scale nets: 0.001)
    seed: int = 0

    def validate(self) -> FinetuneConfig:
        if self.optimizer not in FINETUNE_OPTIMIZERS:
            raise OptionError("optimizer", self.optimizer, FINETUNE_OPTIMIZERS)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise OptionError(name, getattr(self, name), ["a positive integer"])
        for name in ("learning_rate", "rho", "gamma", "weight_decay", "warmup_epochs"):
            if getattr(self, name) < 0 or (name == "learning_rate" and self.learning_rate == 0):
                raise OptionError(name, getattr(self, name), ["a positive number"])
        return self


@dataclass
class FinetunedModel:
    """θ̃ (eval mode) with its validation accuracy and loss, before and after, and the epochs run."""

    model: nn.Module
    validation_accuracy: float
    validation_loss: float
    initial_validation_accuracy: float
    initial_validation_loss: float
    learning_rate: float  # the rate that was used (after any backtracking)
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def plateau(self) -> float:
        """Relative fall of the validation loss over the last 3 epochs (≈ 0 once it has plateaued)."""
        losses = [h["loss"] for h in self.history]
        before = losses[max(0, len(losses) - 4)]
        return (before - losses[-1]) / before if before > 0 else 0.0

    def summary(self) -> dict[str, float]:
        return {"validation_accuracy": self.validation_accuracy, "validation_loss": self.validation_loss,
                "validation_accuracy_before": self.initial_validation_accuracy,
                "validation_loss_before": self.initial_validation_loss, "finetune_epochs": self.epochs,
                "finetune_learning_rate": self.learning_rate, "finetune_plateau": self.plateau}


@torch.no_grad()
def _evaluate(model: nn.Module, trained: TrainedModel, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean loss and accuracy on the whole validation set, eval mode."""
    loss, correct = 0.0, 0
    for lo in range(0, len(x), 512):
        logits = model(x[lo:lo + 512])
        loss += float(trained.task.loss(logits, y[lo:lo + 512], reduction="sum"))
        correct += int((logits.argmax(1) == y[lo:lo + 512]).sum())
    return loss / len(x), correct / len(x)


def _perturbed_gradient(model: nn.Module, loss_fn, config: FinetuneConfig, generator: torch.Generator) -> None:
    """Leave in ``.grad`` the gradient at the SAM / LPF perturbation of the weights (weights restored)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sam":
        loss_fn().backward()
    with torch.no_grad():
        if config.optimizer == "sam":
            norm = torch.sqrt(sum(p.grad.square().sum() for p in params if p.grad is not None))
            shifts = [config.rho * p.grad / (norm + 1e-12) if p.grad is not None else None for p in params]
        else:  # lpf: Gaussian noise per output filter of Linear/Conv weights, std γ·‖filter‖
            shifts = [None] * len(params)
            weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
            for i, p in enumerate(params):
                if id(p) in weights:
                    scale = config.gamma * p.flatten(1).norm(dim=1).view(-1, *[1] * (p.ndim - 1))
                    shifts[i] = torch.randn(p.shape, generator=generator).to(p) * scale
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
    config.validate()
    start = time.perf_counter()
    device, task = trained.device, trained.task
    x = task.inputs(validation.images, device)
    y = torch.as_tensor(validation.labels, device=device)
    initial_loss, initial_accuracy = _evaluate(trained.model.eval(), trained, x, y)
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
    return FinetunedModel(model, history[-1]["accuracy"], loss, initial_accuracy, initial_loss, rate, len(history),
                          time.perf_counter() - start, history)


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
    generator = torch.Generator().manual_seed(config.seed)
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
                _perturbed_gradient(model, batch_loss, config, generator)
            optimizer.step()
            schedule.step()
        loss, accuracy = _evaluate(model, trained, x, y)
        history.append({"epoch": epoch, "loss": loss, "accuracy": accuracy, "learning_rate": config.learning_rate})
        progress(epoch, config.epochs, "fine-tuning on the validation set")
        if not np.isfinite(loss):
            history[-1]["loss"] = float("inf")  # diverged: the caller retries at a lower rate
            break
    return history

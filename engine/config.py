"""The training recipe (:class:`TrainConfig`, its presets) and what it may start from.

Its own module because the trainer, the stage store and the start network all read it: here it
depends on none of them, so none of them depends on another just for the recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import DataError, InfluenceLensError, OptionError, TrainingError
from engine.models import HEAD_MODEL, MODEL_NAMES

SCHEDULES = ("onecycle", "cosine")
AUGMENTATIONS = ("auto", "none", "crop", "flip-crop")
FREEZE_CHOICES = ("backbone", "none")
TIMM_PREFIX = "timm:"
MAX_EPOCHS = 100_000  # beyond any sane recipe; a run too long for its data is stopped by its time estimate
MAX_DEFAULT_THREADS = 8  # the default's bound: a CPU training of this size gains little beyond, and cores stay free
MAX_SEED = 2**32 - 1  # numpy's and torch's generators both take seeds in 0..2^32-1 without surprises
MAX_THREADS = 1024


def default_threads() -> int:
    """The training threads a recipe gets unless it says: the cores this process may use, at most
    ``MAX_DEFAULT_THREADS`` (the CLI and the dashboard both take it, so they agree on one machine)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_THREADS))


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe. Defaults suit the small CNN on small images on a CPU."""

    model: str = "auto"
    epochs: int = 15  # digits / MNIST-scale nets fit in ~10-15 epochs; more mostly memorizes noise
    batch_size: int = 64
    learning_rate: float = 0.05  # peak of the schedule; SGD+momentum on BN nets is stable here
    momentum: float = 0.9
    weight_decay: float = 5e-4  # docs/methods.md §3: influence estimates need weight decay
    schedule: str = "onecycle"
    augment: str = "auto"  # flip+crop for RGB photos, crop only for grayscale (digits are not mirror-symmetric)
    checkpoints: int = 5  # evenly spaced epochs, the last one included
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True  # bf16 autocast, GPU only
    # Start from a network you have (engine.start, engine.frozen): a state_dict for the built-in model
    # (``weights``), a TorchScript feature extractor (``backbone``), a timm model (``model="timm:NAME"``,
    # ``pretrained``), or features already computed (``embeddings``, an .npy aligned with the index).
    weights: str | None = None
    backbone: str | None = None
    embeddings: str | None = None
    pretrained: bool = False
    # "backbone": compute the features once and train the head alone (the default with a start);
    # "none": fine-tune every layer from the given weights.
    freeze: str | None = None
    # CPU threads while training. Part of the recipe because float sums split over more threads round
    # differently: the same count gives the same weights, another count slightly different ones. Default:
    # the machine's cores (default_threads); 1 gives the same weights on every machine.
    threads: int = field(default_factory=default_threads)

    def validate(self) -> TrainConfig:
        if self.model not in (*MODEL_NAMES, HEAD_MODEL) and not is_timm(self.model):
            raise OptionError("model", self.model, MODEL_NAMES)
        check_start(self)
        if self.schedule not in SCHEDULES:
            raise OptionError("schedule", self.schedule, SCHEDULES)
        if self.augment not in AUGMENTATIONS:
            raise OptionError("augment", self.augment, AUGMENTATIONS)
        for name in ("epochs", "batch_size", "checkpoints", "threads"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.epochs > MAX_EPOCHS:
            raise TrainingError(f"epochs must be at most {MAX_EPOCHS:,}, got {self.epochs:,}")
        if self.threads > MAX_THREADS:
            raise TrainingError(f"threads must be at most {MAX_THREADS}, got {self.threads}")
        if not 0 <= self.seed <= MAX_SEED:
            raise TrainingError(f"seed must be an integer in 0..{MAX_SEED}, got {self.seed}")
        if not 0 < self.learning_rate < float("inf"):
            raise TrainingError(f"learning_rate must be a positive number, got {self.learning_rate}")
        return self


PRESETS: dict[str, TrainConfig] = {
    "fast-cpu": TrainConfig(),
    # CIFAR-scale ResNet-18 on a GPU: ~12 epochs reach ~85-90% on CIFAR-10 (data README).
    "full-gpu": TrainConfig(model="resnet18", epochs=12, batch_size=256, learning_rate=0.1, device="cuda"),
}


def is_timm(model: str | None) -> bool:
    return bool(model) and model.startswith(TIMM_PREFIX)


def has_start(config: TrainConfig) -> bool:
    """Whether the run starts from a network (or features) the user gave, not from scratch."""
    return bool(config.weights or config.backbone or config.embeddings or is_timm(config.model))


def head_only(config: TrainConfig) -> bool:
    """True on the frozen-feature path: features computed once, only a linear head trained."""
    return bool(config.backbone or config.embeddings) or (has_start(config) and config.freeze != "none")


def check_start(config: TrainConfig) -> None:
    """Refuse combinations that cannot work, and files that are not there, before any work."""
    if config.freeze is not None and config.freeze not in FREEZE_CHOICES:
        raise OptionError("freeze", config.freeze, FREEZE_CHOICES)
    if config.freeze is not None and not has_start(config):
        raise InfluenceLensError(f"--freeze {config.freeze} needs a network to start from: give --weights, "
                                 "--backbone, --model timm:NAME or --embeddings")
    if config.pretrained and not is_timm(config.model):
        raise InfluenceLensError("--pretrained applies to --model timm:NAME (use --weights FILE for a built-in model)")
    if config.backbone and config.embeddings:
        raise InfluenceLensError("give either --backbone or --embeddings, not both")
    if (config.backbone or config.embeddings) and (config.weights or is_timm(config.model)):
        raise InfluenceLensError("--weights and --model timm:NAME start a network; --backbone and --embeddings "
                                 "bring their own features: choose one")
    if (config.backbone or config.embeddings) and config.freeze == "none":
        raise InfluenceLensError("--backbone and --embeddings train the head alone; --freeze none needs --weights "
                                 "for a built-in model or --model timm:NAME")
    for option, path in (("weights", config.weights), ("backbone", config.backbone),
                         ("embeddings", config.embeddings)):
        if path:
            check_start_file(path, f"--{option}")


def check_start_file(path: str, option: str) -> None:
    """The file exists and is a regular file (a folder or a FIFO named as a file says so; a FIFO would block)."""
    file = Path(path)
    if file.is_dir():
        raise DataError(f"{path}: {option} is a folder; give the file itself")
    if file.exists() and not file.is_file():
        raise DataError(f"{path}: {option} is not a regular file (a FIFO, device or socket)")
    if not file.is_file():
        raise DataError(f"{path}: {option} file not found")

"""Train a classifier, keeping checkpoints with the mean learning rate of the steps each stands for (TracIn needs both).

Small and airbench-like: the data live as one tensor, batches are index slices of a seeded
permutation. The permutation is taken over the samples sorted by their stable index, so the
result does not depend on the order of the rows handed in.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TrainConfig
from engine.data import Dataset
from engine.device import resolve_device
from engine.distributed import LOCAL, Distributed
from engine.errors import TrainingError
from engine.models import choose_model
from engine.progress import Progress, no_progress
from engine.sources import FileSource, inference_batch, is_lazy, memory_budget
from engine.sources import batches as read_batches
from engine.start import start_model
from engine.task import Task, fit_task

DIVERGENCE_RESTARTS = 2  # a diverging training starts again at a tenth of the learning rate, this often
# An epoch's mean loss this many times the chance level log(C) (or not finite) means the run has blown
# up: a healthy run starts near log(C) and falls.
DIVERGED_LOSS_FACTOR = 100.0


@dataclass(frozen=True)
class Checkpoint:
    """Model weights after ``epoch``, and the ``steps`` optimizer steps taken since the previous
    checkpoint (or the start) with their mean learning rate: TracIn-CP lets this checkpoint stand
    for all of them, so it weighs ``mean_learning_rate × steps``, the sum of their rates."""

    epoch: int
    mean_learning_rate: float
    state: dict[str, torch.Tensor]
    steps: int = 1

    @property
    def step_weight(self) -> float:
        """Σ η over the steps since the previous checkpoint (TracIn-CP's weight of this checkpoint)."""
        return self.mean_learning_rate * self.steps


@dataclass
class TrainedModel:
    """A trained classifier with its task, recipe, checkpoints and per-epoch history."""

    model: nn.Module
    task: Task
    config: TrainConfig
    model_name: str
    device: torch.device
    num_classes: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # e.g. a restart at a lower learning rate after divergence

    def model_at(self, checkpoint: Checkpoint) -> nn.Module:
        """A copy of the model in eval mode with the checkpoint's weights."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(checkpoint.state)
        return model.eval()

    def settings(self) -> dict:
        return {**asdict(self.config), "model": self.model_name, "device": str(self.device)}


def _checkpoint_epochs(epochs: int, count: int) -> set[int]:
    return {int(round(e)) for e in np.linspace(epochs / min(count, epochs), epochs, min(count, epochs))}


def _canonical_order(dataset: Dataset) -> np.ndarray:
    return np.argsort(dataset.index, kind="stable")


def _training_images(images):
    """What the epochs read batches from: image files decoded once into memory when they fit the
    budget (every epoch reads every row), else read per batch by worker processes; rows of an array
    (a memory map of features or embeddings) are cheap to read per batch and stay where they are."""
    if is_lazy(images) and isinstance(images.source, FileSource) and images.nbytes <= memory_budget():
        return images[:]
    return images


def _augment(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to H/8 pixels (zero padding) and, for ``flip-crop``, mirror."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    if mode == "flip-crop":
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def _make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    if config.schedule == "onecycle":
        # PyTorch divides by (warm-up steps - 1): a warm-up of exactly one step (0.25 × 4) is a
        # zero-length phase. A slightly longer warm-up there leaves every other step count as it was.
        warmup = 0.25 if 0.25 * total_steps != 1 else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate,
                                                   total_steps=total_steps, pct_start=warmup)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


class _Diverged(Exception):
    def __init__(self, loss: float, epoch: int):
        super().__init__(loss, epoch)
        self.loss, self.epoch = loss, epoch


def train(dataset: Dataset, config: TrainConfig = TrainConfig(), *, task: Task | None = None,
          progress: Progress = no_progress, distributed: Distributed = LOCAL) -> TrainedModel:
    """Train on ``dataset`` with ``config``. If the loss diverges, start again at a tenth of the
    learning rate (``DIVERGENCE_RESTARTS`` times, said in the model's ``notes`` and its config);
    :class:`TrainingError` if it still diverges.

    ``distributed``: train with DDP, each global batch split across the ranks (see
    :mod:`engine.distributed`); the result equals single-process training up to float rounding
    (every rank sees the same all-reduced loss, so all restart together).
    """
    config.validate()
    tried, notes = [], []
    for _ in range(DIVERGENCE_RESTARTS + 1):
        try:
            with _threads(config.threads):
                trained = _train_once(dataset, config, task=task, progress=progress, distributed=distributed)
            trained.notes = notes
            return trained
        except _Diverged as exc:
            diverged = exc  # ``exc`` itself is unbound after the except block
            tried.append(config.learning_rate)
            notes.append(f"the training loss became {diverged.loss:.3g} in epoch {diverged.epoch} at learning rate "
                         f"{config.learning_rate:g}; started again at {config.learning_rate / 10:g}")
            config = replace(config, learning_rate=config.learning_rate / 10)
    raise TrainingError(f"the training loss became {diverged.loss:.3g} in epoch {diverged.epoch} even at learning rate "
                        f"{tried[-1]:g} (tried {', '.join(f'{r:g}' for r in tried)}); lower the learning rate")


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Train on ``count`` CPU threads (the calling thread's setting), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_once(dataset: Dataset, config: TrainConfig, *, task: Task | None, progress: Progress,
                distributed: Distributed) -> TrainedModel:
    """One training run; :class:`_Diverged` as soon as an epoch's mean loss is not finite."""
    if len(dataset) < 2:
        raise TrainingError(f"{dataset.source or 'training set'}: training needs at least 2 training samples, "
                            f"got {len(dataset)}")
    if min(dataset.image_shape[:2]) < 2:
        raise TrainingError(f"{dataset.source or 'training set'}: images of {dataset.image_shape[0]}×"
                            f"{dataset.image_shape[1]} pixels are too small to train on (2×2 at least)")
    device = resolve_device(config.device)
    task = task or fit_task(dataset)
    model_name = choose_model(dataset.image_shape, device) if config.model == "auto" else config.model
    augment = config.augment
    if dataset.holds_features:
        augment = "none"  # feature rows: nothing to crop or flip
    elif augment == "auto":
        augment = "flip-crop" if dataset.channels == 3 else "crop"
    order = _canonical_order(dataset)
    images = _training_images(dataset.images)
    y_all = torch.as_tensor(dataset.labels[order], device=device)
    n = len(dataset)
    batches = [(s, min(s + config.batch_size, n)) for s in range(0, n, config.batch_size)]
    if len(batches) > 1 and batches[-1][1] - batches[-1][0] < 2:
        batches.pop()  # BatchNorm cannot train on a batch of one

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        model = start_model(model_name, dataset, config, device)
    net = distributed.training_module(model)  # ``model`` itself single-process
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                nesterov=True, weight_decay=config.weight_decay)
    schedule = _make_schedule(optimizer, config, config.epochs * len(batches))
    keep = _checkpoint_epochs(config.epochs, config.checkpoints)
    autocast = device.type == "cuda" and config.mixed_precision
    result = TrainedModel(model, task, config, model_name, device, dataset.num_classes)
    start = time.perf_counter()
    rates_since_checkpoint: list[float] = []
    for epoch in range(1, config.epochs + 1):
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=generator).to(device)
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen, lrs = 0, []
        rows = order[perm.cpu().numpy()]  # the epoch's rows in dataset positions
        read = read_batches(images, rows[:batches[-1][1]], batch_size=config.batch_size)
        for b, (lo, hi) in enumerate(batches):
            idx = perm[lo:hi]
            x, y = task.inputs(next(read)[1], device), y_all[idx]
            if augment != "none":
                x = _augment(x, augment, generator)
            part = distributed.shard(hi - lo)  # this rank's rows of the global batch
            x, y = x[part], y[part]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = net(x)
            # The loss and its gradient on one thread: their kernels hand a batch's rows to threads (an OpenMP
            # wake-up each: 80% of a linear head's step on 2 busy cores) and compute each row alone, so the
            # count does not change them; the network's own backward keeps ``config.threads``.
            with _threads(1):
                loss = distributed.batch_loss(task.loss, logits, y, hi - lo)
                (logits_gradient,) = torch.autograd.grad(loss, logits)
            optimizer.zero_grad(set_to_none=True)
            logits.backward(logits_gradient)
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach() * ((hi - lo) / distributed.world_size)
            correct += (logits.argmax(1) == y).sum()
            seen += hi - lo
            progress((epoch - 1) * len(batches) + b + 1, config.epochs * len(batches), f"training: epoch {epoch}")
        loss_sum, correct = distributed.all_reduce_sum(loss_sum), distributed.all_reduce_sum(correct)
        mean_loss = float(loss_sum) / seen
        if not np.isfinite(mean_loss) or mean_loss > DIVERGED_LOSS_FACTOR * np.log(max(dataset.num_classes, 2)):
            raise _Diverged(mean_loss, epoch)
        result.history.append({"epoch": epoch, "loss": mean_loss, "accuracy": float(correct) / seen,
                               "learning_rate": float(np.mean(lrs))})
        rates_since_checkpoint += lrs
        if epoch in keep:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            result.checkpoints.append(Checkpoint(epoch, float(np.mean(rates_since_checkpoint)), state,
                                                 len(rates_since_checkpoint)))
            rates_since_checkpoint = []
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


@dataclass(frozen=True)
class Predictions:
    """Model outputs for a dataset, as CPU arrays aligned with its rows."""

    logits: np.ndarray  # float64
    features: np.ndarray  # float32, as the network computes them (N×D: a float64 copy doubles the largest array)

    @property
    def probabilities(self) -> np.ndarray:
        z = self.logits - self.logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


@torch.no_grad()
def predict(model: nn.Module, task: Task, images: np.ndarray, device: torch.device,
            *, batch_size: int | None = None) -> Predictions:
    """Logits and penultimate features in eval mode (BatchNorm uses running statistics), in batches
    whose size follows the memory budget (:func:`engine.sources.inference_batch`)."""
    model.eval()
    logits = features = None  # filled in place: a list of batches and its concatenation would hold two copies
    for rows, batch in read_batches(images, batch_size=batch_size or inference_batch(images.shape[1:])):
        a = model.features(task.inputs(batch, device))
        z = model.head(a)
        if features is None:
            logits = np.empty((len(images), *z.shape[1:]))
            features = np.empty((len(images), *a.shape[1:]), dtype=np.float32)
        logits[rows] = z.double().cpu().numpy()
        features[rows] = a.float().cpu().numpy()
    if not np.isfinite(logits).all():
        raise TrainingError("the model's outputs are NaN or infinite (training diverged); lower the learning rate")
    return Predictions(logits, features)


def evaluate(trained: TrainedModel, dataset: Dataset) -> float:
    """Accuracy of the trained model on ``dataset`` (labels as given)."""
    preds = predict(trained.model, trained.task, dataset.images, trained.device)
    return float((preds.predicted == dataset.labels).mean())

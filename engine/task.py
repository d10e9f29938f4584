"""The classification task: a dataset's rows → normalized tensors, and batch → loss.

Scorers and the trainer go through this object instead of unpacking batches themselves. Two kinds
of rows, two sibling tasks: :class:`ImageTask` for uint8 images, :class:`FeatureTask` for the float
feature rows of the head-only path (:mod:`engine.frozen`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from engine.data import Dataset
from engine.sources import batches, inference_batch


@dataclass(frozen=True)
class Task(ABC):
    """What both tasks share: per-channel (or per-dimension) statistics fitted on the training rows,
    and the cross-entropy loss. ``kind`` names the task in stored stages (:func:`task_from`)."""

    kind: ClassVar[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    @abstractmethod
    def fit(cls, dataset: Dataset) -> Task:
        """The task's statistics, fitted on ``dataset``'s rows."""

    @abstractmethod
    def inputs(self, rows: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """A batch of the dataset's rows as the network's normalized float input, on ``device``."""

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, reduction=reduction)


@dataclass(frozen=True)
class ImageTask(Task):
    """uint8 images normalized per channel by statistics fitted on the training images."""

    kind: ClassVar[str] = "image"

    @classmethod
    def fit(cls, dataset: Dataset) -> ImageTask:
        """Per-channel mean and standard deviation of the pixels in [0, 1], from integer sums over
        batches (exact, so the result does not depend on the batch size, and never a float copy of
        every pixel)."""
        sums = np.zeros((2, dataset.channels), dtype=object)  # Python integers: exact at any N
        for _, batch in batches(dataset.images, batch_size=inference_batch(dataset.image_shape, cap=4096)):
            pixels = batch.reshape(-1, dataset.channels).astype(np.int64)
            sums[0] += pixels.sum(0)
            sums[1] += np.square(pixels).sum(0)
        count = len(dataset) * int(np.prod(dataset.image_shape[:2]))
        mean = [float(s) / count / 255.0 for s in sums[0]]
        var = [float(count * q - s * s) / count**2 / 255.0**2 for s, q in zip(sums[0], sums[1], strict=True)]
        return cls(tuple(mean), tuple(float(max(np.sqrt(v), 1e-3)) for v in var))

    def inputs(self, images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """uint8 N×H×W(×C) → float N×C×H×W, normalized, on ``device``."""
        x = torch.as_tensor(np.asarray(images), device=device)  # a LazyImages decodes its rows here
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return x.float().div_(255.0).sub_(mean).div_(std)  # in place: one float copy of the batch, not four


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy of integer labels under float64 logits (the task's loss, on CPU arrays)."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return log_norm - z[np.arange(len(labels)), labels]


@dataclass(frozen=True)
class FeatureTask(Task):
    """The head-only path's task: float32 feature rows standardised per dimension (fitted on the
    training rows; a linear map, so the head's problem stays convex)."""

    kind: ClassVar[str] = "features"

    @classmethod
    def fit(cls, dataset: Dataset) -> FeatureTask:
        """Per-dimension mean and standard deviation, merged over batches of rows in float64 (Chan et
        al.'s pairwise update: no float64 copy of every row)."""
        count, mean, squares = 0, np.zeros(dataset.image_shape[0]), np.zeros(dataset.image_shape[0])
        for _, batch in batches(dataset.images, batch_size=inference_batch(dataset.image_shape, cap=65536)):
            rows = batch.astype(np.float64)
            n, batch_mean = len(rows), rows.mean(0)
            delta = batch_mean - mean
            squares += np.square(rows - batch_mean).sum(0) + np.square(delta) * count * n / (count + n)
            mean += delta * n / (count + n)
            count += n
        return cls(tuple(mean.tolist()), tuple(np.maximum(np.sqrt(squares / count), 1e-6).tolist()))

    def inputs(self, rows: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """float N×D feature rows → float32 N×D, standardised, on ``device``."""
        x = torch.as_tensor(np.asarray(rows), device=device, dtype=torch.float32)
        return (x - torch.tensor(self.mean, device=device)) / torch.tensor(self.std, device=device)


def fit_task(dataset: Dataset) -> Task:
    """The task for a dataset: image normalisation, or feature standardisation for feature rows."""
    return (FeatureTask if dataset.holds_features else ImageTask).fit(dataset)


TASKS: dict[str, type[Task]] = {task.kind: task for task in (ImageTask, FeatureTask)}


def task_from(kind: str, mean: tuple[float, ...], std: tuple[float, ...]) -> Task:
    """The task a stored stage names by its ``kind``, with its statistics."""
    return TASKS[kind](tuple(mean), tuple(std))

"""The classification task: uint8 images → normalized tensors, and batch → loss.

Scorers and the trainer go through this object instead of unpacking batches themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.data import Dataset


@dataclass(frozen=True)
class ImageTask:
    """Per-channel normalization fitted on the training images, and the cross-entropy loss."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, dataset: Dataset) -> ImageTask:
        pixels = dataset.images.reshape(len(dataset), -1, dataset.channels).astype(np.float64) / 255.0
        std = pixels.std(axis=(0, 1))
        return cls(tuple(pixels.mean(axis=(0, 1)).tolist()), tuple(np.maximum(std, 1e-3).tolist()))

    def inputs(self, images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """uint8 N×H×W(×C) → float N×C×H×W, normalized, on ``device``."""
        x = torch.as_tensor(images, device=device)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return ((x.float() / 255.0) - mean) / std

    @property
    def kind(self) -> str:
        return "image"

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, reduction=reduction)


@dataclass(frozen=True)
class FeatureTask(ImageTask):
    """The head-only path's task: float32 feature rows standardised per dimension (fitted on the
    training rows; a linear map, so the head's problem stays convex)."""

    @classmethod
    def fit(cls, dataset: Dataset) -> FeatureTask:
        rows = dataset.images.astype(np.float64)
        return cls(tuple(rows.mean(0).tolist()), tuple(np.maximum(rows.std(0), 1e-6).tolist()))

    @property
    def kind(self) -> str:
        return "features"

    def inputs(self, images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        x = torch.as_tensor(images, device=device, dtype=torch.float32)
        return (x - torch.tensor(self.mean, device=device)) / torch.tensor(self.std, device=device)


def fit_task(dataset: Dataset) -> ImageTask:
    """The task for a dataset: image normalisation, or feature standardisation for feature rows."""
    return FeatureTask.fit(dataset) if dataset.images.ndim == 2 else ImageTask.fit(dataset)


def task_from(kind: str, mean: tuple[float, ...], std: tuple[float, ...]) -> ImageTask:
    return (FeatureTask if kind == "features" else ImageTask)(tuple(mean), tuple(std))

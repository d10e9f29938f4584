"""The frozen-feature stage: a backbone run once per dataset, and a linear head trained on its features.

``freeze="backbone"`` (the default whenever a start is given, and the only road for a TorchScript
backbone or embeddings) runs the backbone (a start network, :mod:`engine.start`) once per dataset and
keeps its N×D features as a stage of a resumable run (:mod:`engine.stages`), or reads the user's
embeddings where they lie, and trains the head alone (:class:`engine.models.LinearHead`) on them. The
training loss is then convex in the head's parameters and its GGN is its Hessian: the scorers are told
(``ScoringContext.head_only``) and each result's ``trained_part`` says what that means for its method
(exact only with the ``last`` head curvature; EK-FAC approximates it). Every other method runs on the
head too (cleanlab's folds retrain the head). With ``freeze="none"`` none of this runs: the trainer
fine-tunes every layer of the start network.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch
from torch import nn

from engine.config import TIMM_PREFIX, TrainConfig, head_only, is_timm
from engine.data import Dataset
from engine.device import resolve_device
from engine.distributed import LOCAL, Distributed
from engine.errors import DataError
from engine.models import HEAD_MODEL, choose_model
from engine.progress import Progress, no_progress
from engine.sources import LazyImages, array_rows, batches, inference_batch
from engine.stages import RowStream, StageStore, digest, fetch_rows, fingerprint
from engine.start import file_hash, load_torchscript, start_model, timm_body, timm_data_config
from engine.task import ImageTask

# The README's rule for --backbone modules without their own ``mean`` / ``std`` attributes: pixels in
# [0, 1], then ImageNet's per-channel normalisation (what nearly every pretrained network expects);
# grayscale images use the mean of the three channels' values.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The feature stage: float16 rows (half the disk and page cache of float32; a feature's relative rounding
# of 5e-4 is far below what moves a ranking), written in chunks of this many rows, each one saved before
# the next starts (a kill loses one chunk at most). A multiple of every inference batch (powers of two up to
# 256), so one pass of batches fills the chunks with the rows each would get from a pass of its own.
FEATURE_DTYPE = np.dtype(np.float16)
FEATURE_CHUNK_ROWS = 4096


def head_config(config: TrainConfig) -> TrainConfig:
    """The recipe of the head trained on feature rows (what made the features is in their fingerprint)."""
    return replace(config, model=HEAD_MODEL, weights=None, backbone=None, embeddings=None, pretrained=False,
                   freeze=None)


def read_embeddings(path: str) -> np.ndarray:
    """An N×D float ``.npy`` (memory-mapped, no pickle), checked to be finite."""
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # not an .npy, a pickled object array, a truncated file
        raise DataError(f"{path}: not a readable .npy array ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(rows, np.ndarray):  # an .npz archive loads as a mapping of arrays
        with contextlib.suppress(Exception):
            rows.close()
        raise DataError(f"{path}: an .npz archive; --embeddings takes one N×D float array saved with np.save (.npy)")
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.floating):
        raise DataError(f"{path}: embeddings must be an N×D float array, got {rows.dtype} of shape {rows.shape}")
    if rows.shape[1] == 0:
        raise DataError(f"{path}: embeddings have 0 columns (shape {rows.shape}); each row needs D ≥ 1 features")
    step = max(1, 2**26 // max(1, rows[:1].nbytes))  # checked in slices: the file is never read whole
    for lo in range(0, len(rows), step):
        finite = np.isfinite(rows[lo:lo + step]).all(1)
        if not finite.all():
            raise DataError(f"{path}: embeddings contain NaN or infinite values (row {lo + int(np.argmin(finite))} "
                            "first)")
    return rows


def check_embeddings(path: str, dataset: Dataset) -> None:
    """The rows must follow the dataset's index: one per listed sample (row i is the sample of index i)."""
    rows = read_embeddings(path)
    _check_index(path, dataset)
    expected = len(dataset) + len(dataset.skipped)
    if len(rows) != expected or int(dataset.index.max()) >= len(rows):
        raise DataError(f"{path}: {len(rows)} embedding rows, the data {dataset.source or ''} has {expected} "
                        "samples; row i must be the sample of index i (the dataset's order)")


def _check_index(path: str, dataset: Dataset) -> None:
    """Row i is the sample of index i: a negative index would silently take a row from the end."""
    if len(dataset) and int(dataset.index.min()) < 0:
        raise DataError(f"{dataset.source or 'the data'}: index {int(dataset.index.min())} is negative; with "
                        f"--embeddings {path} row i is the sample of index i, so indices must be 0..N-1")


@dataclass
class FrozenBackbone:
    """What turns a dataset into feature rows: a network run once, or the user's embeddings."""

    config: TrainConfig
    train_set: Dataset  # the normalisation of built-in weights is fitted on it, as the trainer would
    device: torch.device
    notes: list[str] = field(default_factory=list)

    @cached_property
    def _network(self) -> tuple[nn.Module, ImageTask, str]:
        config = self.config
        if config.backbone:
            module = load_torchscript(config.backbone, self.device)
            channels = self.train_set.channels
            mean = getattr(module, "mean", None) or (IMAGENET_MEAN if channels == 3 else (np.mean(IMAGENET_MEAN),))
            std = getattr(module, "std", None) or (IMAGENET_STD if channels == 3 else (np.mean(IMAGENET_STD),))
            mean, std = (_per_channel(config.backbone, name, values, channels)
                         for name, values in (("mean", mean), ("std", std)))
            return module, ImageTask(mean, std), file_hash(config.backbone)
        if is_timm(config.model):
            body = timm_body(config.model[len(TIMM_PREFIX):], pretrained=config.pretrained, weights=config.weights)
            data = timm_data_config(body)
            return body.to(self.device).eval(), ImageTask(tuple(data["mean"]), tuple(data["std"])), \
                f"{config.model}:{config.pretrained}:{config.weights and file_hash(config.weights)}"
        model = start_model(config.model if config.model != "auto" else
                            choose_model(self.train_set.image_shape, self.device), self.train_set, config, self.device)
        return _FeaturesOf(model).eval(), ImageTask.fit(self.train_set), f"{config.model}:{file_hash(config.weights)}"

    @property
    def identity(self) -> str:
        """What the features depend on besides the rows: the file, the network, the normalisation."""
        if self.config.embeddings:
            return f"embeddings:{file_hash(self.config.embeddings)}"
        module, task, source = self._network
        return f"{source}:{task}"

    @cached_property
    def _embeddings(self) -> np.ndarray:
        """The user's embeddings file, mapped and checked once for every dataset of the run (a second map
        of a 1 GB file would count its pages twice)."""
        return read_embeddings(self.config.embeddings)

    def embedding_rows(self, dataset: Dataset) -> LazyImages:
        """The user's embeddings of the dataset's rows: a view of the memory-mapped file, read per batch."""
        rows = self._embeddings
        _check_index(self.config.embeddings, dataset)
        if int(dataset.index.max()) >= len(rows):
            raise DataError(f"{self.config.embeddings}: {len(rows)} rows, but {dataset.source or 'the data'} has "
                            f"index {int(dataset.index.max())}; --embeddings covers the training file's rows only")
        return array_rows(rows, dataset.index, np.float32)

    def features(self, dataset: Dataset) -> np.ndarray:
        """The backbone's float32 features of every row (:meth:`feature_batches` joined)."""
        return np.concatenate([rows for _, rows in self.feature_batches(dataset)])

    @torch.no_grad()
    def feature_batches(self, dataset: Dataset, start: int = 0,
                        progress: Progress = no_progress) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(positions, float32 features)`` of the rows from ``start`` on, in batches that follow the
        memory budget, the images decoded ahead by worker processes."""
        module, task, _ = self._network
        where = self.config.backbone or self.config.weights or self.config.model
        for positions, images in batches(dataset.images, np.arange(start, len(dataset)),
                                         batch_size=inference_batch(dataset.image_shape, cap=256)):
            batch = task.inputs(images, self.device)
            try:
                out = module(batch)
            except Exception as exc:  # the module's own code failed (wrong channels, its own raise)
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [exc.__class__.__name__]
                said = lines[-1] if "TorchScript interpreter" in lines[0] else lines[0]  # the module's own words
                raise DataError(f"{where}: the backbone failed on a batch of shape {tuple(batch.shape)} (N×C×H×W; "
                                f"C is the data's channels): {said[:300]}") from None
            if not isinstance(out, torch.Tensor) or out.ndim != 2 or len(out) != len(positions):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise DataError(f"{where}: the backbone returned {shape} for a batch of "
                                f"{len(positions)} images; it must return N×D features")
            if out.shape[1] == 0:
                raise DataError(f"{where}: the backbone returned {tuple(out.shape)}, 0 features per image; it must "
                                "return N×D features with D ≥ 1")
            part = out.float().cpu().numpy()
            if not np.isfinite(part).all():
                raise DataError(f"{where}: the backbone's features contain NaN or infinite values")
            progress(int(positions[-1]) + 1, len(dataset), "features: running the backbone")
            yield positions, part


def _as_stored(rows: np.ndarray, *, where: str) -> np.ndarray:
    """Feature rows as :data:`FEATURE_DTYPE`, refused when a value lies beyond its range."""
    limit = float(np.finfo(FEATURE_DTYPE).max)
    if rows.size and float(np.abs(rows).max()) > limit:
        raise DataError(f"{where}: the backbone's features reach {float(np.abs(rows).max()):.3g}, beyond the "
                        f"{limit:g} that the feature stage stores ({FEATURE_DTYPE}); scale the backbone's output")
    return rows.astype(FEATURE_DTYPE)


def _per_channel(path: str, name: str, values, channels: int) -> tuple[float, ...]:
    """A TorchScript module's ``mean`` / ``std``: one finite number per channel of the data (std > 0);
    five values on grayscale would silently make a five-channel input."""
    try:
        numbers = tuple(float(v) for v in (values if hasattr(values, "__iter__") else [values]))
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != channels or not all(math.isfinite(v) for v in numbers) or (
            name == "std" and not all(v > 0 for v in numbers)):
        raise DataError(f"{path}: the module's {name} attribute is {values!r}; the data has {channels} channel(s), "
                        f"so it must hold {channels} finite number(s){' above 0' if name == 'std' else ''}")
    return numbers


class _FeaturesOf(nn.Module):
    """A built-in model's penultimate activations as a module (its ``features``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def frozen_inputs(config: TrainConfig, train_set: Dataset, *others: Dataset | None,
                  stages: StageStore | None = None, progress: Progress = no_progress,
                  distributed: Distributed = LOCAL) -> tuple[TrainConfig, Dataset, list[Dataset | None]]:
    """On the head-only path, the datasets as feature rows (each computed once and kept in ``stages``)
    and the head's recipe; otherwise everything unchanged."""
    if not head_only(config):
        return config, train_set, list(others)
    backbone = FrozenBackbone(config, train_set, resolve_device(config.device))
    identity = backbone.identity

    def as_features(dataset: Dataset | None) -> Dataset | None:
        if dataset is None:
            return None
        if config.embeddings:
            return replace(dataset, images=backbone.embedding_rows(dataset), holds_features=True)

        stream = RowStream(lambda lo: backbone.feature_batches(dataset, lo, progress))

        def chunk(lo: int, hi: int) -> np.ndarray:
            return _as_stored(stream(lo, hi), where=config.backbone or config.weights or config.model)

        rows = fetch_rows(stages, "features", digest("features", identity, fingerprint(dataset)), len(dataset), chunk,
                          chunk_rows=FEATURE_CHUNK_ROWS, dtype=FEATURE_DTYPE,
                          label=f"features:{dataset.source or 'data'}", distributed=distributed)
        return replace(dataset, images=array_rows(rows, np.arange(len(rows))), holds_features=True)

    return head_config(config), as_features(train_set), [as_features(d) for d in others]

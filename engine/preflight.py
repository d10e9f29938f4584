"""Before a run: what the data holds, and how long training on it will take on this device.

The set-up page shows both before Run. Neither reads the user's pixels: an image folder or a
manifest is previewed from the file headers (size and mode), and the training throughput is
measured on random images of the same shape, so both take seconds even on a large folder.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.config import TrainConfig, head_only
from engine.data import Dataset, image_folder_files, load_dataset, manifest_files, most_common_size, read_header
from engine.device import resolve_device
from engine.errors import DataError, InfluenceLensError
from engine.frozen import FrozenBackbone, head_config, read_embeddings
from engine.scorers import scorer_class
from engine.sources import memory_budget
from engine.training import train

# Headers read at most: on a 50,000-file folder reading every one takes tens of seconds on a slow disk,
# and 2,000 evenly spaced files give the size mix to within a few percent.
PREVIEW_HEADERS = 2000


@dataclass(frozen=True)
class DataPreview:
    """What loading ``source`` will give, before it is loaded."""

    source: str
    class_names: tuple[str, ...]
    counts: tuple[int, ...]  # images per class
    sizes: dict[str, int]  # "W×H" → images of that size among the headers read, most common first
    image_shape: tuple[int, ...]  # what training sees: the most common size; RGB when any image is
    resized: int  # images that will be resized to ``image_shape`` (estimated when only some headers were read)
    headers_read: int  # images whose size was read (all of them unless there are more than PREVIEW_HEADERS)
    unreadable: int  # of those, files that are not readable images (left out of the run)

    @property
    def images(self) -> int:
        return sum(self.counts)


def preview_data(spec: str) -> DataPreview:
    """Classes, counts and image sizes of ``spec`` (as :func:`engine.data.load_dataset` takes it)."""
    text = str(spec).strip()
    path = Path(text)
    if path.is_dir():
        files, labels, names = image_folder_files(path)
    elif path.is_file() and path.suffix.lower() == ".csv":
        files, labels, names = manifest_files(path)
    else:  # the sample data or an .npz: already decoded arrays, small enough to load
        return _preview_of(load_dataset(text))  # (also raises the loader's error for a bad path)
    counts = np.bincount(labels, minlength=len(names))
    picked = np.unique(np.linspace(0, len(files) - 1, min(len(files), PREVIEW_HEADERS)).round().astype(int))
    sizes: Counter[tuple[int, int]] = Counter()
    rgb, unreadable = False, 0
    for i in picked:
        try:
            height, width, colour = read_header(files[i])  # the loader's own reading: EXIF rotation included
        except DataError:
            unreadable += 1
            continue
        sizes[(height, width)] += 1
        rgb = rgb or colour
    if not sizes:
        raise DataError(f"{text}: none of the {len(picked)} files checked is a readable image")
    target = most_common_size(sizes)
    share_resized = 1 - sizes[target] / sum(sizes.values())
    return DataPreview(text, names, tuple(int(c) for c in counts), _size_labels(sizes),
                       (*target, 3) if rgb else target, round(share_resized * len(files)), len(picked), unreadable)


def _preview_of(dataset: Dataset) -> DataPreview:
    h, w = dataset.image_shape[:2]
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    return DataPreview(dataset.source, dataset.class_names, tuple(int(c) for c in counts), {f"{w}×{h}": len(dataset)},
                       dataset.image_shape, 0, len(dataset), 0)


def _size_labels(sizes: Counter) -> dict[str, int]:
    return {f"{w}×{h}": n for (h, w), n in sizes.most_common()}


@dataclass(frozen=True)
class TimeEstimate:
    """How long a run takes on this device, from a measured training throughput."""

    device: str
    model: str
    images_per_second: float  # training throughput measured on random images (or feature rows) of the run's shape
    training_seconds: float  # one training with the recipe on every training image
    method_seconds: dict[str, float]  # the trainings a method adds on top (cleanlab's K folds)
    # A frozen backbone's one pass over every image (its network time, measured on random images; the
    # decoding of the files comes on top); the training above is then the head's, on its features.
    feature_seconds: float = 0.0

    @property
    def total_seconds(self) -> float:
        return self.feature_seconds + self.training_seconds + sum(self.method_seconds.values())


def estimate_run_time(n: int, image_shape: tuple[int, ...], num_classes: int, config: TrainConfig,
                      methods: list[str] | tuple[str, ...] = ()) -> TimeEstimate:
    """Time three epochs of the recipe on 2 batches of random images shaped like the data and scale the
    faster of the last two (the first pays the warm-up; on a shared machine one can be slowed by
    others) to ``config.epochs`` epochs of ``n`` images. cleanlab
    adds its K trainings on (K-1)/K of the data; the other methods' scoring is not counted (it costs
    less than one training with the default settings)."""
    config.validate()
    if n < 1 or num_classes < 2:
        raise DataError(f"a time estimate needs images and 2 classes or more (got {n} images, {num_classes} classes)")
    probe_n = 2 * config.batch_size
    probe_bytes = probe_n * int(np.prod(image_shape))
    if probe_bytes > memory_budget():  # the probe itself would not fit: say so, allocate nothing
        raise InfluenceLensError(f"no time estimate: {probe_n} probe images of {'×'.join(map(str, image_shape))} "
                                 f"take {probe_bytes / 2**30:.1f} GiB, more than the memory budget")
    rng = np.random.default_rng(0)
    probe = Dataset(rng.integers(0, 256, (probe_n, *image_shape), dtype=np.uint8),
                    np.arange(probe_n, dtype=np.int64) % num_classes, tuple(map(str, range(num_classes))),
                    source="throughput probe")
    features = 0.0
    ticks: list[float] = []
    try:
        if head_only(config):  # the backbone runs once per image; the head trains on its features
            features, rows = _feature_pass(probe, config, n)
            probe, config = replace(probe, images=rows, holds_features=True), head_config(config)
        # cosine: a step costs the same under any schedule, and one-cycle cannot be set over 6 steps
        trained = train(probe, replace(config, epochs=3, checkpoints=1, schedule="cosine"),
                        progress=lambda done, total, message: ticks.append(time.perf_counter()))
    except RuntimeError as exc:  # torch's allocator: a batch of this shape does not fit in memory
        if "allocate" not in str(exc):
            raise
        raise InfluenceLensError(f"no time estimate: a batch of {probe_n} images of "
                                 f"{'×'.join(map(str, image_shape))} does not fit in memory here") from None
    steps = len(ticks) // 3  # per epoch; ticks come after each step
    epoch_ends = [ticks[e * steps - 1] for e in (1, 2, 3)]
    fastest = max(min(epoch_ends[1] - epoch_ends[0], epoch_ends[2] - epoch_ends[1]), 1e-9)
    per_second = probe_n / fastest
    training = config.epochs * n / per_second
    extra = {}
    if "cleanlab" in methods:
        folds = scorer_class("cleanlab").Settings().folds
        extra["cleanlab"] = folds * (folds - 1) / folds * training
    return TimeEstimate(str(trained.device), trained.model_name, per_second, training, extra, features)


def _feature_pass(probe: Dataset, config: TrainConfig, n: int) -> tuple[float, np.ndarray]:
    """Seconds of the frozen backbone over ``n`` images (the faster of two timed passes over the probe,
    after one to warm up; none for embeddings), and the probe's feature rows."""
    backbone = FrozenBackbone(config, probe, resolve_device(config.device))
    if config.embeddings:
        width = read_embeddings(config.embeddings).shape[1]
        return 0.0, np.random.default_rng(0).normal(size=(len(probe), width)).astype(np.float32)
    rows = backbone.features(probe)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        backbone.features(probe)
        times.append(time.perf_counter() - start)
    return n * min(times) / len(probe), rows.astype(np.float32)

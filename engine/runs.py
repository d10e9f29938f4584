"""A reviewable run: its settings, its data, and scoring it into a workspace (cached per configuration).

The dashboard's "set up a run" is this module: settings name the data (with the demo noise, if
any), the validation and test sets and the training recipe; :func:`score_into` trains once and
stores every method's result, the model outputs the review pages show, and the training summary in
the workspace under a hash of the settings and the data, so coming back to a configuration costs
nothing and only methods not yet stored are computed. Within a method, the stages (trained model,
fine-tuned model, curvature, score shards) are saved in the workspace folder as they finish
(:mod:`engine.stages`), so a run killed mid-way resumes from its last finished stage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.config import PRESETS, TrainConfig, default_threads, head_only
from engine.data import NOISE_KINDS, Dataset, conform, load_dataset
from engine.device import DEVICE_NAMES
from engine.distributed import LOCAL, Distributed
from engine.errors import DataError, OptionError
from engine.frozen import check_embeddings
from engine.pipeline import carve_validation, check_compatible, score_methods, with_injected_noise
from engine.progress import Progress, no_progress
from engine.scorers import scorer_class
from engine.scorers.flat_validation import CURVATURES
from engine.stages import StageStore, fingerprint
from engine.start import backbone_size, file_hash, start_notes
from engine.thumbnails import store_top
from engine.training import TrainedModel, predict
from engine.workspace import Workspace


@dataclass(frozen=True)
class RunSettings:
    """What defines a run. ``epochs`` / ``device`` / ``learning_rate`` / ``model`` of None take the
    preset's values; ``curvature`` of None, the vm / fvm default."""

    data: str = "sample"
    validation: str | None = None  # a trusted set (path, or ``sample:val``)
    val_from_train: float | None = None  # or carve an untrusted one out of the training data
    test: str | None = None  # for retraining; ``sample:test`` by default on the sample data
    noise_rate: float = 0.0  # demo: inject this fraction of label noise, so the truth is known
    noise_kind: str = "symmetric"
    preset: str = "fast-cpu"
    epochs: int | None = None
    seed: int = 0
    device: str | None = None
    learning_rate: float | None = None
    model: str | None = None
    curvature: str | None = None
    # Bring your model (engine.start, engine.frozen): the TrainConfig fields of the same names.
    weights: str | None = None
    backbone: str | None = None
    embeddings: str | None = None
    freeze: str | None = None
    pretrained: bool = False
    image_size: int | None = None  # resize at load: shorter side to this, centre crop (engine.data)
    # CPU threads while training: part of the recipe (TrainConfig.threads); the machine's cores by default
    threads: int = field(default_factory=default_threads)

    def validate(self) -> RunSettings:
        if self.preset not in PRESETS:
            raise OptionError("preset", self.preset, list(PRESETS))
        if self.noise_kind not in NOISE_KINDS:
            raise OptionError("noise kind", self.noise_kind, NOISE_KINDS)
        if self.device is not None and self.device not in DEVICE_NAMES:
            raise OptionError("device", self.device, DEVICE_NAMES)
        if self.curvature is not None and self.curvature not in CURVATURES:
            raise OptionError("curvature", self.curvature, CURVATURES)
        if not (isinstance(self.noise_rate, (int, float)) and 0 <= self.noise_rate < 1):  # NaN fails too
            raise DataError(f"noise rate must be in [0, 1), got {self.noise_rate}")
        if self.validation and self.val_from_train:
            raise DataError("choose either a trusted validation set or a fraction carved from training, not both")
        if self.image_size is not None and not 2 <= self.image_size <= 4096:
            raise DataError(f"--image-size must be a side length in pixels from 2 to 4096, got {self.image_size}")
        if self.embeddings and (self.validation or self.test):
            raise DataError("--embeddings has rows for the training file only: carve the validation set with "
                            "--val-from-train (a separate validation or test set needs its own features)")
        self.train_config()
        return self

    def train_config(self) -> TrainConfig:
        preset = PRESETS[self.preset]
        return replace(preset, epochs=self.epochs or preset.epochs, seed=self.seed, device=self.device or preset.device,
                       learning_rate=self.learning_rate or preset.learning_rate,
                       model=self.model or preset.model, weights=self.weights, backbone=self.backbone,
                       embeddings=self.embeddings, freeze=self.freeze, pretrained=self.pretrained,
                       threads=self.threads).validate()

    def method_settings(self, methods: list[str]) -> dict[str, Any]:
        """Scorer settings these settings change (``curvature`` for the methods that have one)."""
        if self.curvature is None:
            return {}
        defaults = {m: scorer_class(m).Settings() for m in methods}
        return {m: replace(d, curvature=self.curvature) for m, d in defaults.items() if hasattr(d, "curvature")}

    @property
    def test_spec(self) -> str | None:
        return self.test or ("sample:test" if _is_sample(self.data) and not self.embeddings else None)

    def data_key(self) -> str:
        """The labelled data under review: the workspace is one per key (demo noise included)."""
        key = self.data if _is_sample(self.data) else str(Path(self.data).expanduser().resolve())
        if self.noise_rate > 0:
            key += f" noise={self.noise_kind}:{self.noise_rate:g}:seed{self.seed}"
        return key

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RunSettings:
        """Settings stored before a field existed get the value they ran with (``_START_DEFAULTS``: one
        training thread), not today's default, so they keep their hash."""
        return cls(**{**_START_DEFAULTS, **{k: v for k, v in values.items() if k in cls.__dataclass_fields__}})


def input_shape(settings: RunSettings, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a run's network takes for images of ``image_shape``: the ``--image-size`` (or the
    backbone's own input size) square, the channels kept; ``image_shape`` itself otherwise."""
    size = settings.image_size or backbone_size(settings.train_config())
    return image_shape if size is None else (size, size, *image_shape[2:])


def _is_sample(spec: str) -> bool:
    return spec == "sample" or spec.startswith("sample:")


@dataclass(frozen=True)
class RunData:
    """The datasets of a run. ``flipped``/``clean_labels`` are known only with demo noise."""

    train: Dataset  # the rows that are scored (after noise, without a carved validation part)
    full_train: Dataset  # every training row as given (with noise): what the exports list
    validation: Dataset | None
    validation_trusted: bool
    test: Dataset | None
    flipped: np.ndarray | None
    clean_labels: np.ndarray | None
    fingerprint: str
    notes: tuple[str, ...] = ()  # what loading changed (resized images, a replaced head), for the user

    @property
    def truth_known(self) -> bool:
        return self.flipped is not None


def check_populated_classes(dataset: Dataset) -> None:
    """Training needs samples of two classes at least: class names alone (labels all 0 of three names, or a
    class whose every file was unreadable and skipped) would train a constant and report nonsense."""
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    if np.count_nonzero(counts) < 2 and len(dataset) >= 2:  # a single sample: "at least 2 training samples"
        only = dataset.class_names[int(np.argmax(counts))]
        empty = [c for c, n in zip(dataset.class_names, counts, strict=True) if n == 0]
        raise DataError(f"{dataset.source or 'the data'}: only class {only!r} has samples ({int(counts.max())}); "
                        f"{', '.join(map(repr, empty[:5]))}{' …' if len(empty) > 5 else ''} "
                        f"{'has' if len(empty) == 1 else 'have'} none; a classifier needs samples of 2 classes")


def load_run_data(settings: RunSettings, *, skip_unreadable: bool = True,
                  listings: str | Path | None = None) -> RunData:
    """Load, inject the demo noise, and carve or load the validation set (as the CLI does); with
    ``listings`` (the workspace folder) image headers are remembered between loads (:mod:`engine.listings`)."""
    settings.validate()
    config = settings.train_config()
    size = settings.image_size or backbone_size(config)  # as input_shape says
    lazy = head_only(config)  # each image is read once, for its features: never decoded into memory
    full = load_dataset(settings.data, skip_unreadable=skip_unreadable, image_size=size, lazy=lazy, listings=listings)
    check_populated_classes(full)
    if settings.embeddings:
        check_embeddings(settings.embeddings, full)
    notes = tuple(start_notes(config, full))  # the loaders' own notes stay on the datasets
    flipped = clean = None
    if settings.noise_rate > 0:
        noisy = with_injected_noise(full, rate=settings.noise_rate, kind=settings.noise_kind, seed=settings.seed)
        full, flipped, clean = noisy.dataset, noisy.flipped, noisy.clean_labels
    train_set, validation, trusted = full, None, True
    if settings.validation:
        validation = conform(load_dataset(settings.validation, skip_unreadable=skip_unreadable, image_size=size,
                                          lazy=lazy, listings=listings),
                             train_set.image_shape, "validation")
        check_compatible(train_set, validation, "validation")
    elif settings.val_from_train:
        train_set, validation = carve_validation(full, settings.val_from_train, seed=settings.seed)
        trusted = False
        if flipped is not None:
            keep = np.isin(full.index, train_set.index)
            flipped, clean = flipped[keep], clean[keep]
    test = None
    if settings.test_spec:
        test = conform(load_dataset(settings.test_spec, skip_unreadable=skip_unreadable, image_size=size, lazy=lazy,
                                    listings=listings),
                       full.image_shape, "test")
        check_compatible(full, test, "test")
    return RunData(train_set, full, validation, trusted, test, flipped, clean, fingerprint(train_set, validation),
                   notes)


def reviewed_validation(data: RunData, decisions: pd.DataFrame) -> Dataset:
    """A trusted validation set grown by the samples a person reviewed (docs/methods.md §4: "the samples
    a person has reviewed and confirmed or relabeled"): confirmed ones with their given label,
    relabeled ones with the new label, after the run's own validation set when that one is trusted.
    Rows keep their stable index, or are re-indexed 0..M-1 when the two sets' indices overlap."""
    decided = decisions.set_index("index")
    reviewed = decided[decided["action"].isin(["keep", "relabel"])]
    rows = np.flatnonzero(np.isin(data.train.index, reviewed.index))
    if not len(rows):
        raise DataError("no reviewed samples yet: confirm or relabel some first")
    action = reviewed.loc[data.train.index[rows], "action"].to_numpy()
    new_label = reviewed.loc[data.train.index[rows], "new_label"].to_numpy()
    labels = np.where(action == "relabel", new_label, data.train.labels[rows])
    parts = [(data.train.images[rows], labels, data.train.index[rows])]
    if data.validation is not None and data.validation_trusted:
        parts.insert(0, (data.validation.images, data.validation.labels, data.validation.index))
    images = np.concatenate([p[0] for p in parts])
    index = np.concatenate([p[2] for p in parts])
    return Dataset(images, np.concatenate([p[1] for p in parts]).astype(np.int64), data.train.class_names,
                   index=index if len(np.unique(index)) == len(index) else None,  # embeddings look rows up by it
                   source=f"{data.train.source or 'training'}: reviewed samples as validation")


def config_hash(settings: RunSettings, data: RunData) -> str:
    """Identifies the trained model: the settings that shape it and the data it saw (not the test set)."""
    values = _set_only({k: v for k, v in settings.to_dict().items() if k != "test"})
    values["train_config"] = _set_only(asdict(settings.train_config()))
    values["fingerprint"] = data.fingerprint
    files = [path for path in (settings.weights, settings.backbone, settings.embeddings) if path]
    if files:  # the files' content counts, not only their names
        values["start_files"] = {path: file_hash(path) for path in files}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:20]


# Settings added with "bring your model" and the training threads: left out of the hash at these values (the ones
# runs stored before they existed ran with: one thread), so those runs keep their hash (and their results).
_START_DEFAULTS = {"weights": None, "backbone": None, "embeddings": None, "freeze": None, "pretrained": False,
                   "image_size": None, "threads": 1}


def _set_only(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in _START_DEFAULTS or v != _START_DEFAULTS[k]}


def score_into(workspace: Workspace | None, settings: RunSettings, data: RunData, methods: list[str], *,
               trained: TrainedModel | None = None, progress: Progress = no_progress,
               stages: StageStore | None = None, distributed: Distributed = LOCAL) -> tuple[str, TrainedModel | None]:
    """Score ``methods`` not yet stored for this configuration; returns ``(config_hash, model)``.

    Each method's result is stored as soon as it is computed, and its stages as they finish in
    ``stages`` (by default the ``stages`` folder beside the workspace file). The model is None when
    every method was already stored and no ``trained`` model was handed in. ``distributed``: the
    ranks of a torchrun launch score together (their stages in one folder they all see); only rank 0
    holds the ``workspace`` (None elsewhere) and writes it.
    """
    key = config_hash(settings, data)
    main = distributed.is_main
    if main:
        workspace.save_run(key, settings.to_dict())
    stages = stages if stages is not None else StageStore.in_workspace_folder(workspace.path.parent)
    stored = workspace.results(key) if main else {}
    missing = distributed.gather_objects([m for m in methods if m not in stored])[0]  # rank 0's list
    for method in missing:
        run = score_methods(data.train, [method], validation=data.validation,
                            validation_trusted=data.validation_trusted, config=settings.train_config(),
                            trained=trained, settings=settings.method_settings([method]), progress=progress,
                            stages=stages, distributed=distributed)
        trained = run.trained
        if main:
            _store_model_outputs(workspace, key, data, run)  # also when a model was handed in: a new key
            workspace.save_result(key, run.results[method])
            progress(0, 1, "thumbnails of the top rows")
            store_top(workspace, key, data.train, run.results[method].scores)
    return key, trained


def _store_model_outputs(workspace: Workspace, key: str, data: RunData, run) -> None:
    """What the review pages need without the model: logits and features of train (and validation)."""
    if "logits" in workspace.arrays(key):
        return
    trained = run.trained
    preds = run.context.predictions
    arrays = {"index": data.train.index, "logits": preds.logits.astype(np.float32),
              "features": np.asarray(preds.features, dtype=np.float32)}  # no copy: predict's are float32
    if data.validation is not None:  # the context's copy: feature rows on the head-only path
        val = predict(trained.model, trained.task, run.context.validation.images, trained.device)
        arrays.update(val_index=data.validation.index, val_logits=val.logits.astype(np.float32),
                      val_features=val.features.astype(np.float32))
    workspace.save_arrays(key, arrays)
    workspace.save_report(key, "training", {"device": str(trained.device), "model": trained.model_name,
                                            "seconds": round(trained.seconds, 3), "history": trained.history,
                                            "notes": trained.notes,
                                            "config": asdict(trained.config)})

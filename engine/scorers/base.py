"""The scorer protocol: ``prepare(context)`` once, then ``score(context)`` → :class:`ScoreResult`.

Every score is a suspicion score: one float per training row, higher = more likely mislabeled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, TypeVar

import numpy as np

from engine.curvature import MAX_EXACT_HEAD_DIM
from engine.data import Dataset
from engine.distributed import LOCAL, Distributed
from engine.errors import DataError
from engine.progress import Progress, no_progress
from engine.stages import Codec, StageStore, digest
from engine.training import Predictions, TrainedModel, predict

T = TypeVar("T")


@dataclass
class ScoringContext:
    """What every scorer may use: the training rows, the trained model, an optional trusted set."""

    train: Dataset
    trained: TrainedModel
    validation: Dataset | None = None
    validation_trusted: bool = True
    progress: Progress = no_progress
    stages: StageStore | None = None  # where a resumable run keeps its stages (engine.stages)
    stage_key: str = ""  # hash of the trained model's data and recipe and of the validation set
    distributed: Distributed = LOCAL  # the ranks a prepare's sums over rows are all-reduced across
    # True when ``trained`` is a lone linear head on frozen backbone features (engine.frozen): the
    # rows of ``train.images`` are then feature vectors, and every result says what that means for
    # its method (``trained_part`` in the info, :func:`head_mode_note`).
    head_only: bool = False
    _predictions: Predictions | None = field(default=None, repr=False)
    # Stage values already computed in this run, by stage key: scorers that need the same stage (vm and
    # vm-loss need one θ̃) share it in memory, with or without a stage store on disk.
    _computed: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def predictions(self) -> Predictions:
        """θ*'s logits and features on the training rows, computed once and shared."""
        if self._predictions is None:
            self._predictions = predict(self.trained.model, self.trained.task, self.train.images, self.trained.device)
        return self._predictions

    def share_predictions(self, predictions: Predictions) -> None:
        """Use ``predictions`` as θ*'s on the training rows (e.g. gathered from the ranks' shards)
        instead of computing them here."""
        if len(predictions.logits) != len(self.train):
            raise ValueError(f"{len(predictions.logits)} predictions for {len(self.train)} training rows")
        self._predictions = predictions

    def cached(self, stage: str, what: Any, compute: Callable[[], T], codec: Codec[T], *, label: str = "") -> T:
        """``compute()`` once per run and ``what`` (shared by every scorer that asks); in a resumable
        run, the value a previous run saved (``label`` names it in the run's log of stages)."""
        key = digest(self.stage_key, stage, what)
        if key not in self._computed:
            self._computed[key] = compute() if self.stages is None else self.stages.fetch(
                stage, key, compute, codec, label=f"{stage}:{label}" if label else stage)
        return self._computed[key]

    def has_stage(self, stage: str, what: Any) -> bool:
        """Whether :meth:`cached` would load ``stage`` of ``what`` rather than compute it."""
        key = digest(self.stage_key, stage, what)
        return key in self._computed or (self.stages is not None and self.stages.path(stage, key).exists())

    def fitting_shard(self, rows: Dataset) -> Dataset:
        """This rank's shard of a fitting set (the set itself single-process): a ``prepare`` sums its
        curvature statistics over it and all-reduces them through ``distributed``."""
        if self.distributed.world_size == 1:
            return rows
        if len(rows) < self.distributed.world_size:  # every rank raises: none is left waiting in a collective
            raise DataError(f"{rows.source or 'the fitting set'}: {len(rows)} rows cannot be shared among "
                            f"{self.distributed.world_size} ranks")
        return rows.subset(np.arange(len(rows))[self.distributed.shard(len(rows))])

    def rows(self, rows: np.ndarray) -> ScoringContext:
        """The same run restricted to some training rows (positions), sharing θ*'s predictions."""
        full = self.predictions
        return replace(self, train=self.train.subset(rows),
                       _predictions=Predictions(full.logits[rows], full.features[rows]))


@dataclass
class Scored:
    """What a scorer's ``_score`` returns: scores, suggested labels, info and per-row arrays."""

    scores: np.ndarray
    suggested_labels: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ScoreResult:
    """Per-row suspicion scores and suggested labels, with the settings and timings that made them."""

    method: str
    scores: np.ndarray
    suggested_labels: np.ndarray
    settings: dict[str, Any]
    timings: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    # Per-row arrays beside the scores, e.g. ``probabilities`` (N×C) of the model that did not fit
    # the given labels (θ̃, cleanlab's held-out folds): engine.guidance estimates review depth from them.
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.suggested_labels = np.asarray(self.suggested_labels, dtype=np.int64)
        if self.scores.shape != self.suggested_labels.shape or self.scores.ndim != 1:
            raise ValueError(f"{self.method}: scores and suggested labels must be aligned 1-D arrays")
        if any(len(a) != len(self.scores) for a in self.arrays.values()):
            raise ValueError(f"{self.method}: every per-row array must have one row per score")
        if not np.isfinite(self.scores).all():
            raise ValueError(f"{self.method}: produced non-finite scores")


class Scorer:
    """Base class: subclasses set ``name``, an optional ``Settings`` dataclass, and implement
    ``_prepare`` / ``_score``. ``run`` times both stages."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # Where the suggested label comes from, in words (the sample detail says it beside the probabilities).
    suggestion: ClassVar[str] = "the trained model θ*'s most likely class"
    requires_validation: ClassVar[bool] = False
    # True when a row's score depends only on that row, the model and the validation set (never on
    # other training rows): distributed runs then score one shard of the rows per rank, and
    # resumable runs (engine.stages) save the scores shard by shard.
    row_local: ClassVar[bool] = False
    # True when, once ``prepare`` has run on the whole context, a row's score depends only on that row
    # (a ``prepare`` that fits curvature on the training rows or fine-tunes on the validation set).
    # Distributed runs then prepare on every rank (sums over rows taken over this rank's
    # ``context.fitting_shard`` and all-reduced through ``context.distributed``) and score one shard
    # of rows per rank. Unlike ``row_local``, a chunk of rows alone could not be prepared.
    prepared_row_local: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Settings:
        pass

    def __init__(self, settings: Any = None):
        self.settings = settings if settings is not None else self.Settings()
        self.check_settings()
        self.timings: dict[str, float] = {}

    def check_settings(self) -> None:
        """Refuse bad settings (:class:`engine.errors.OptionError`) when the scorer is made, before any
        training or fine-tuning; subclasses with settings override it."""

    def prepare(self, context: ScoringContext) -> None:
        start = time.perf_counter()
        self._prepare(context)
        self.timings["prepare_seconds"] = time.perf_counter() - start

    def score(self, context: ScoringContext) -> ScoreResult:
        start = time.perf_counter()
        scored = self._score(context)
        self.timings["score_seconds"] = time.perf_counter() - start
        info = scored.info
        if context.head_only:
            info = {"trained_part": head_mode_note(self.name, info, self.settings), **info}
        return ScoreResult(self.name, scored.scores, scored.suggested_labels, asdict(self.settings),
                           dict(self.timings), info, scored.arrays)

    def run(self, context: ScoringContext) -> ScoreResult:
        self.prepare(context)
        return self.score(context)

    def _prepare(self, context: ScoringContext) -> None:
        """Expensive one-off work (fine-tuning, curvature, cross-validation); default: none."""

    def _score(self, context: ScoringContext) -> Scored:
        raise NotImplementedError


HEAD_ONLY = "the head alone, on frozen backbone features"


def head_mode_note(method: str, info: dict[str, Any], settings: Any) -> str:
    """What scoring a lone head means for a method: which curvature, and whether it is exact.

    The head's loss is convex and its GGN is its Hessian, so the ``last`` curvature is the exact
    Hessian (damped); ``ekfac-last`` (taken when (C·D)² is too large, or asked for) and ``ekfac``
    approximate it. Methods without a curvature see the head, the only trainable part.
    """
    kind = info.get("curvature")
    relative = getattr(settings, "damping", None)
    damped = f"damped by λ = {relative:g} × its mean eigenvalue" if relative is not None else "damped"
    if kind == "last":
        return f"{HEAD_ONLY}: {method} uses the head's exact GGN (its Hessian: the head's loss is convex), {damped}"
    if kind == "ekfac-last":
        dim = info.get("curvature_dim")
        size = f" (C·D = {dim:,}; the exact matrix is used up to {MAX_EXACT_HEAD_DIM:,})" if dim else ""
        return (f"{HEAD_ONLY}: {method} uses EK-FAC of the head's GGN{size}, {damped}: an approximation of "
                "the head's Hessian, not the exact form")
    if kind == "ekfac":
        return (f"{HEAD_ONLY}: {method} uses EK-FAC over the head, its only layer, {damped} (per layer): an "
                "approximation of the head's Hessian, not the exact form")
    return f"{HEAD_ONLY}: {method} covers the head, the only trainable part"

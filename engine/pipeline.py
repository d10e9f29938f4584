"""End-to-end runs shared by the CLI, the dashboard, the tests and the benchmarks.

Train once, score with any number of registered methods on the same trained model, turn the
results into the table the CLI writes, apply review decisions, and retrain to measure recovery.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from engine.config import TrainConfig, head_only
from engine.data import Dataset, check_csv_text, inject_noise, stratified_split
from engine.distributed import LOCAL, Distributed
from engine.errors import DataError
from engine.frozen import frozen_inputs
from engine.metrics import ranks
from engine.progress import Progress, no_progress
from engine.safe_files import FORMULA_STARTS
from engine.scorers import ScoreResult, ScoringContext, make_scorer, scorer_class
from engine.scorers.flat_validation import TRUSTED_VALIDATION_HELP
from engine.stages import PLAIN, StageStore, digest, fingerprint, train_in_stages, training_key
from engine.training import Predictions, TrainedModel, evaluate, predict, train

ACTIONS = ("drop", "relabel", "keep")
DECISION_ROW_BYTES = 1024  # one "index,action,new_label" row, however long its class name
RESULT_COLUMNS = ["index", "score", "rank", "given_label", "predicted_label", "suggested_label"]


@dataclass
class NoisyDataset:
    """A dataset with injected noise: the noisy copy, and which rows were flipped."""

    dataset: Dataset
    flipped: np.ndarray
    clean_labels: np.ndarray


def with_injected_noise(dataset: Dataset, *, rate: float, kind: str = "symmetric", seed: int = 0) -> NoisyDataset:
    """Flip a fraction of labels (see :func:`engine.data.inject_noise`); the truth is kept."""
    noisy, flipped = inject_noise(dataset.labels, dataset.num_classes, rate=rate, kind=kind, seed=seed)
    return NoisyDataset(dataset.with_labels(noisy), flipped, dataset.labels.copy())


def carve_validation_fraction(fraction: float) -> None:
    """A carved validation part is a fraction in (0, 0.5) (0 or NaN would silently carve nothing)."""
    if not 0.0 < fraction < 0.5:
        raise DataError(f"--val-from-train must be a fraction in (0, 0.5), got {fraction}")


def carve_validation(train_set: Dataset, fraction: float, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split a seeded, stratified validation part off the training data: ``(rest, validation)``.

    The carved part carries the training set's (possibly noisy) labels, so it is *untrusted*.
    """
    carve_validation_fraction(fraction)
    rest, validation = stratified_split(train_set, (1.0 - fraction, fraction), seed=seed)
    return rest, validation


def check_compatible(train_set: Dataset, other: Dataset, role: str) -> None:
    """A validation or test set must share the training set's classes and image shape."""
    if other.class_names != train_set.class_names:
        raise DataError(f"{other.source or role}: the {role} classes {list(other.class_names)} differ from "
                        f"the training classes {list(train_set.class_names)}")
    if other.image_shape != train_set.image_shape:
        raise DataError(f"{other.source or role}: {role} images are {other.image_shape}, "
                        f"training images are {train_set.image_shape}")


@dataclass
class ScoringRun:
    """One trained model and the results of every method scored on it."""

    context: ScoringContext
    results: dict[str, ScoreResult] = field(default_factory=dict)
    train_seconds: float = 0.0

    @property
    def trained(self) -> TrainedModel:
        return self.context.trained

    def table(self, method: str, flipped: np.ndarray | None = None) -> pd.DataFrame:
        """The per-sample table the CLI writes (``RESULT_COLUMNS``, plus ``is_flipped``)."""
        return result_table(self.context.train, self.results[method], self.context.predictions.predicted, flipped)


def ambiguous_class_names(class_names: tuple[str, ...]) -> bool:
    """Whether a label number could be read as another class's name: folder classes ``0, 1, 10, 2`` make
    label 2 the class named "10", while a class is named "2"."""
    return any(name.isdigit() and name.isascii() and int(name) != position
               for position, name in enumerate(class_names))


def with_class_names(table: pd.DataFrame, class_names: tuple[str, ...]) -> pd.DataFrame:
    """A score table with ``given_class``, ``predicted_class`` and ``suggested_class`` (the names) after
    the label columns, when the names alone would be ambiguous (:func:`ambiguous_class_names`)."""
    if not ambiguous_class_names(class_names):
        return table
    named = table.copy()
    for kind in ("suggested", "predicted", "given"):
        column = f"{kind}_label"
        if column in named.columns:
            named.insert(named.columns.get_loc(column) + 1, f"{kind}_class",
                         [class_names[int(v)] for v in named[column]])
    return named


def decision_label(class_names: tuple[str, ...], label: int) -> str:
    """``new_label`` as :func:`read_decisions` reads it back: the class name, or ``name:NAME`` where the bare
    name would also be another class's label number."""
    name = class_names[int(label)]
    return f"name:{name}" if ambiguous_class_names(class_names) and name.isdigit() else name


def result_table(train_set: Dataset, result: ScoreResult, predicted: np.ndarray,
                 flipped: np.ndarray | None = None) -> pd.DataFrame:
    """Rows by rank (most suspicious first): ``RESULT_COLUMNS``, plus ``is_flipped`` when known."""
    frame = pd.DataFrame({
        "index": train_set.index,
        "score": result.scores,
        "rank": ranks(result.scores),
        "given_label": train_set.labels,
        "predicted_label": predicted,
        "suggested_label": result.suggested_labels,
    })
    if flipped is not None:
        frame["is_flipped"] = np.asarray(flipped, dtype=int)
    return frame.sort_values("rank", kind="stable").reset_index(drop=True)


def score_methods(train_set: Dataset, methods: list[str], *, validation: Dataset | None = None,
                  validation_trusted: bool = True, config: TrainConfig = TrainConfig(),
                  trained: TrainedModel | None = None, settings: dict[str, Any] | None = None,
                  progress: Progress = no_progress, distributed: Distributed = LOCAL,
                  stages: StageStore | None = None) -> ScoringRun:
    """Train (unless ``trained`` is given) and score ``train_set`` with every named method.

    ``settings``: method name → that scorer's ``Settings`` (defaults for methods not named).
    ``distributed``: train with DDP and split the scoring across the ranks (:mod:`engine.distributed`);
    every rank returns the same merged run.
    ``stages``: make the run resumable (:mod:`engine.stages`): the trained model, the scorers' own
    stages and the scores are loaded when a previous run saved them, else saved once computed.
    """
    settings = settings or {}
    if len(train_set) < distributed.world_size:
        raise DataError(f"{len(train_set)} training rows cannot be shared among {distributed.world_size} ranks")
    for name in methods:
        if scorer_class(name).requires_validation and validation is None:
            raise DataError(f"method {name!r} {TRUSTED_VALIDATION_HELP}")
    scorers = [make_scorer(name, settings.get(name)) for name in methods]  # bad settings fail before training
    if validation is not None:
        check_compatible(train_set, validation, "validation")
    start = time.perf_counter()
    frozen = head_only(config)
    config, train_set, (validation,) = frozen_inputs(config, train_set, validation, stages=stages, progress=progress,
                                                     distributed=distributed)
    if trained is None:
        trained = train_in_stages(train_set, config, stages, progress=progress, distributed=distributed)
    stage_key = digest(training_key(train_set, trained.config), fingerprint(validation)) if stages else ""
    context = ScoringContext(train_set, trained, validation, validation_trusted, progress, stages, stage_key,
                             distributed, head_only=frozen)
    if distributed.world_size > 1:
        context.share_predictions(_sharded_predictions(context, distributed))
    run = ScoringRun(context, train_seconds=time.perf_counter() - start)
    for scorer in scorers:
        run.results[scorer.name] = _score_in_stages(scorer, context)
    return run


def _score_in_stages(scorer, context: ScoringContext) -> ScoreResult:
    """The one executor of a scorer, in one process or on the ranks of a torchrun launch, resumable
    with a stage store or not.

    The rows are cut into shards: blocks of ``shard_rows`` for a ``row_local`` scorer in a resumable
    run; one contiguous part per rank for a ``row_local`` or ``prepared_row_local`` scorer under
    torchrun; else one. Shard k is this rank's when k mod K is its rank (every shard is every rank's
    for a scorer that cannot be split: each then scores every row). A shard a previous run saved is
    loaded; if any rank has one to compute, every rank prepares (a prepare's sums over rows are
    all-reduced) and computes its own, each saved as it finishes. The shards are gathered in row
    order on every rank: a finished configuration loads its scores and computes nothing."""
    start, n, ranks = time.perf_counter(), len(context.train), context.distributed
    split = (scorer.row_local or scorer.prepared_row_local) and ranks.world_size > 1
    if scorer.row_local and context.stages is not None:
        bounds = [*range(0, n, context.stages.shard_rows), n]
    else:
        bounds = ranks.bounds(n).tolist() if split else [0, n]
    shards = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
    mine = [k for k in range(len(shards)) if not split or k % ranks.world_size == ranks.rank]

    def what(k: int) -> tuple:
        return scorer.name, scorer.settings, *shards[k]

    missing = sum(not context.has_stage("scores", what(k)) for k in mine)
    if int(ranks.all_reduce_sum(torch.tensor(missing))) > 0:
        scorer.prepare(context)

    def compute(lo: int, hi: int) -> dict:
        part = scorer.score(context if (lo, hi) == (0, n) else context.rows(np.arange(lo, hi)))
        info = part.info if context.stages is None else json.loads(json.dumps(part.info, default=_json_value))
        return {"scores": torch.from_numpy(part.scores), "suggested": torch.from_numpy(part.suggested_labels),
                "info": info, "arrays": {name: torch.from_numpy(a) for name, a in part.arrays.items()}}

    def label(k: int) -> str:
        return scorer.name if len(shards) == 1 else f"{scorer.name}[{shards[k][0]}:{shards[k][1]}]"

    parts = {k: context.cached("scores", what(k), partial(compute, *shards[k]), PLAIN, label=label(k)) for k in mine}
    if split:
        parts = {k: part for rank_parts in ranks.gather_objects(parts) for k, part in rank_parts.items()}
    parts = [parts[k] for k in range(len(shards))]
    scored = time.perf_counter() - start - scorer.timings.get("prepare_seconds", 0.0)
    timings = {**scorer.timings, "score_seconds": scored}
    info = _merge_info([p["info"] for p in parts], [hi - lo for lo, hi in shards])
    if ranks.world_size > 1:
        info["distributed"] = {"ranks": ranks.world_size, "sharded": split,
                               **({} if split else {"note": "every rank scored every row"})}
    return ScoreResult(scorer.name, np.concatenate([p["scores"].numpy() for p in parts]),
                       np.concatenate([p["suggested"].numpy() for p in parts]), asdict(scorer.settings), timings,
                       info, {name: np.concatenate([p["arrays"][name].numpy() for p in parts])
                              for name in parts[0].get("arrays", {})})


def _json_value(value: Any) -> Any:
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else str(value)


def _merge_info(infos: list[dict], sizes: list[int]) -> dict:
    """One info for the shards of a row-local scorer: what all shards agree on, and the row-weighted
    mean of numbers that differ (per-row rates such as the share of suggestions agreeing with argmax;
    anything else that differs, e.g. float rounding across ranks, is the first shard's)."""
    merged = {}
    for key, value in infos[0].items():
        values = [info[key] for info in infos]
        numbers = all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values)
        merged[key] = value if all(v == value for v in values) or not numbers else \
            float(np.average(values, weights=sizes))
    return merged


def _sharded_predictions(context: ScoringContext, distributed: Distributed) -> Predictions:
    """θ*'s predictions on the training rows, one shard per rank, gathered in row order."""
    trained, n = context.trained, len(context.train)
    local = predict(trained.model, trained.task, context.train.subset(np.arange(n)[distributed.shard(n)]).images,
                    trained.device)
    return Predictions(distributed.gather_rows(local.logits, n), distributed.gather_rows(local.features, n))


def read_decisions(path: str, dataset: Dataset) -> pd.DataFrame:
    """Read and validate a decisions CSV (``index,action,new_label``) against ``dataset``."""
    _check_decisions_file(Path(path), len(dataset))
    _check_decisions_text(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:  # a folder, an empty file, a parser error, not UTF-8
        raise DataError(f"{path}: not a readable decisions CSV ({exc})") from None
    missing = [c for c in ("index", "action", "new_label") if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    bad_actions = sorted(set(frame["action"]) - set(ACTIONS))
    if bad_actions:
        raise DataError(f"{path}: unknown action(s) {bad_actions}; valid: {', '.join(ACTIONS)}")
    indices = [_decision_index(text, row, path) for row, text in enumerate(frame["index"], start=1)]
    unknown = sorted(set(indices) - set(dataset.index.tolist()))
    if unknown:
        raise DataError(f"{path}: index {unknown[0]} is not in the training set ({len(unknown)} unknown)")
    frame["index"] = np.asarray(indices, dtype=np.int64)
    if frame["index"].duplicated().any():
        raise DataError(f"{path}: index {int(frame['index'][frame['index'].duplicated()].iloc[0])} has two decisions")
    frame["new_label"] = [_label_id(v, dataset, path) if a == "relabel" else -1
                          for v, a in zip(frame["new_label"], frame["action"], strict=True)]
    return frame


def _check_decisions_file(path: Path, rows: int) -> None:
    """A decisions file has at most one row per training sample: refuse a FIFO (reading it would wait
    forever) and a file far larger than that, before reading any of it."""
    if path.exists() and not path.is_dir() and not path.is_file():
        raise DataError(f"{path}: not a regular file (a FIFO, device or socket)")
    limit = (rows + 1) * DECISION_ROW_BYTES
    if path.is_file() and path.stat().st_size > limit:
        raise DataError(f"{path}: {path.stat().st_size:,} bytes, more than {limit:,} for the decisions on "
                        f"{rows:,} training samples (one row each, {DECISION_ROW_BYTES} bytes at most)")


def _check_decisions_text(path: str) -> None:
    """An unterminated quote or a column named twice, named before pandas reads around them."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return  # pandas' own reading says what is wrong
    header = next(csv.reader(io.StringIO(text)), []) if text.strip() else []
    check_csv_text(text, path, [h.strip() for h in header])


def _decision_index(text: str, row: int, path: str) -> int:
    text = text.strip()
    if not text:
        raise DataError(f"{path}: decision {row} has a blank index")
    if not re.fullmatch(r"[+-]?[0-9]+", text):  # int() also reads "1_0" as 10, and other scripts' digits
        raise DataError(f"{path}: decision {row} has index {text!r}, not an integer")
    return int(text)


def _label_id(value: str, dataset: Dataset, path: str) -> int:
    text = str(value).strip()
    if text.startswith("'") and text[1:].startswith((*FORMULA_STARTS, "'")):  # quoted by a spreadsheet-safe export
        text = text[1:]
    number = int(text) if re.fullmatch(r"[0-9]+", text) else None
    if text in dataset.class_names:
        position = dataset.class_names.index(text)
        if number is not None and number != position and number < dataset.num_classes:
            raise DataError(f"{path}: new_label {text!r} is ambiguous: class {text!r} is label {position}, and label "
                            f"{number} is class {dataset.class_names[number]!r}; write the class as "
                            f"'name:{text}' or 'label:{position}'")
        return position
    if text.startswith("name:") and text[5:] in dataset.class_names:
        return dataset.class_names.index(text[5:])
    if text.startswith("label:") and re.fullmatch(r"[0-9]+", text[6:]):
        number = int(text[6:])
    label = -1 if number is None else number
    if not 0 <= label < dataset.num_classes:
        raise DataError(f"{path}: new_label {text!r} is not a class name or a label in 0..{dataset.num_classes - 1}")
    return label


def apply_decisions(dataset: Dataset, decisions: pd.DataFrame) -> Dataset:
    """Drop and relabel rows (by stable index) on a copy; ``keep`` changes nothing."""
    position = {int(i): p for p, i in enumerate(dataset.index)}
    labels = dataset.labels.copy()
    keep = np.ones(len(dataset), dtype=bool)
    for idx, action, new_label in zip(decisions["index"], decisions["action"], decisions["new_label"], strict=True):
        row = position[int(idx)]
        if action == "drop":
            keep[row] = False
        elif action == "relabel":
            labels[row] = int(new_label)
    if not keep.any():
        raise DataError(f"the decisions drop all {len(dataset)} training samples; nothing is left to train on")
    return dataset.with_labels(labels).subset(keep)


def class_accuracies(trained: TrainedModel, dataset: Dataset) -> list[float | None]:
    """Accuracy per class on ``dataset`` (None for a class it has no samples of)."""
    predicted = predict(trained.model, trained.task, dataset.images, trained.device).predicted
    return [float((predicted[dataset.labels == c] == c).mean()) if (dataset.labels == c).any() else None
            for c in range(dataset.num_classes)]


def retrain_comparison(train_set: Dataset, decisions: pd.DataFrame, test_set: Dataset, *,
                       config: TrainConfig = TrainConfig(), before: TrainedModel | None = None,
                       progress: Progress = no_progress) -> dict:
    """Train on the data as given and with the decisions applied (same seed and recipe).

    ``before``: the model already trained on ``train_set`` with ``config`` (saves one training).
    """
    check_compatible(train_set, test_set, "test")
    config, train_set, (test_set,) = frozen_inputs(config, train_set, test_set, progress=progress)
    cleaned = apply_decisions(train_set, decisions)
    before = before or train(train_set, config, progress=progress)
    after = train(cleaned, replace(config, model=before.model_name), task=before.task, progress=progress)
    return {"test_accuracy_before": evaluate(before, test_set), "test_accuracy_after": evaluate(after, test_set),
            "n_dropped": int((decisions["action"] == "drop").sum()),
            "n_relabeled": int((decisions["action"] == "relabel").sum()),
            "class_accuracy_before": class_accuracies(before, test_set),
            "class_accuracy_after": class_accuracies(after, test_set)}

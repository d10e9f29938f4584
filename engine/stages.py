"""Resumable scoring: each finished stage of a run kept on disk under a hash of what produced it.

A scoring run is a chain of stages, each far dearer to compute than to load: the trained model
(with the checkpoints TracIn needs), the model fine-tuned on the validation set, a scorer's
curvature (or its cross-validation folds), and the scores themselves in row shards. With a
:class:`StageStore`, every stage is looked up by a hash of everything that determines it (the
data's fingerprint, the training recipe, the scorer and its settings, the rows) before it is
computed, and saved as soon as it is. A run killed mid-way restarts from its last saved stage;
a configuration that finished loads its stages and computes nothing. The engine's own source is
part of every hash: after an upgrade (or an edit) nothing computed by other code is reused.

Files are written under a temporary name, flushed to disk, then moved into place with
``os.replace``: a kill leaves the complete file or none. Two processes computing the same stage
both write a complete file and the last rename wins. A file that cannot be read is recomputed and
replaced; a stage that cannot be saved (disk full) is logged and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from engine.backbones import build_network
from engine.data import Dataset
from engine.device import resolve_device
from engine.progress import Progress
from engine.sources import is_lazy
from engine.task import task_from
from engine.training import Checkpoint, TrainConfig, TrainedModel, train

log = logging.getLogger(__name__)

STAGE_FOLDER = "stages"  # inside a workspace folder, beside the workspace files
# Rows per score shard: a multiple of every batch size in use (256 per-sample, 512 predict), so a
# shard boundary is a batch boundary and sharded scores equal unsharded ones bit for bit.
SHARD_ROWS = 4096
_TEMPORARY = ".tmp"

T = TypeVar("T")


def fingerprint(*datasets: Dataset | None) -> str:
    """A short hash of the images, labels and stable index of the datasets (None skipped)."""
    digest = hashlib.sha256()
    for ds in datasets:
        if ds is not None:
            files = ds.images.file_identity() if is_lazy(ds.images) else None
            if files is not None:  # the files' names, sizes and mtimes, not their pixels
                digest.update(files)
            else:  # the rows' bytes in slices (a memory map or a view is never copied whole)
                step = max(1, (64 * 2**20) // max(1, ds.images[:1].nbytes))
                for lo in range(0, len(ds.images), step):
                    digest.update(np.ascontiguousarray(ds.images[lo:lo + step]).tobytes())
            for array in (ds.labels, ds.index):
                digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_ENGINE_SOURCE = _source_hash()


def _plain(value: Any) -> Any:
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else str(value)


def digest(*parts: Any) -> str:
    """A stable hash of JSON-able parts (dataclasses as their fields) and of the engine's source."""
    text = json.dumps([_ENGINE_SOURCE, *parts], sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def training_key(dataset: Dataset, config: TrainConfig) -> str:
    """What determines a trained model: the recipe and the data it saw (rows, labels, index)."""
    return digest("train", config, fingerprint(dataset))


@dataclass(frozen=True)
class Codec(Generic[T]):
    """How a stage's value becomes a ``torch.save``-able state (tensors, numbers, strings) and back."""

    encode: Callable[[T], dict]
    decode: Callable[[dict], T]


def _identity(state: dict) -> dict:
    return state


PLAIN = Codec(_identity, _identity)  # values that already are such states


@dataclass
class StageStore:
    """One folder of stage files ``<stage>-<hash>.pt``; ``log`` lists what this process reused or computed."""

    folder: Path
    shard_rows: int = SHARD_ROWS
    log: list[tuple[str, str]] = field(default_factory=list)  # (stage, "reused" | "computed")

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self._remove_orphans()

    @classmethod
    def in_workspace_folder(cls, folder: str | Path) -> StageStore:
        return cls(Path(folder) / STAGE_FOLDER)

    def path(self, stage: str, key: str) -> Path:
        return self.folder / f"{stage}-{key}.pt"

    def fetch(self, stage: str, key: str, compute: Callable[[], T], codec: Codec[T], *, label: str | None = None) -> T:
        """The stored value of ``stage`` under ``key``, else ``compute()`` saved before it is returned."""
        path = self.path(stage, key)
        label = label or stage
        if path.exists():
            try:
                value = codec.decode(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as exc:  # a damaged or foreign file: recompute and replace it
                log.warning("%s: unreadable stage file, computing it again (%s)", path, str(exc).splitlines()[0])
            else:
                self.log.append((label, "reused"))
                return value
        value = compute()
        self._save(path, codec.encode(value))
        self.log.append((label, "computed"))
        return value

    def summary(self) -> dict[str, list[str]]:
        return {kind: [label for label, k in self.log if k == kind] for kind in ("reused", "computed")}

    def _save(self, path: Path, state: dict) -> None:
        temporary = path.with_name(f".{path.name}.{os.getpid()}{_TEMPORARY}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
            _fsync_folder(self.folder)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            log.warning("%s: could not save this stage, the run goes on without it (%s)", path,
                        str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)

    def _remove_orphans(self) -> None:
        """Temporary files left by killed processes (a live writer's files are kept)."""
        for orphan in self.folder.glob(f".*{_TEMPORARY}") if self.folder.is_dir() else ():
            pid = orphan.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
                orphan.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# -- the trained model ----------------------------------------------------------------------------

def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _encode_trained(trained: TrainedModel, image_shape: tuple[int, ...]) -> dict:
    return {"model_name": trained.model_name, "num_classes": trained.num_classes, "config": asdict(trained.config),
            "image_shape": list(image_shape),
            "task": {"kind": trained.task.kind, "mean": list(trained.task.mean), "std": list(trained.task.std)},
            "state": _cpu_state(trained.model), "seconds": trained.seconds, "history": trained.history,
            "notes": trained.notes,
            "checkpoints": [{"epoch": c.epoch, "learning_rate": c.learning_rate, "state": c.state, "steps": c.steps}
                            for c in trained.checkpoints]}


def _decode_trained(state: dict) -> TrainedModel:
    config = TrainConfig(**state["config"])
    device = resolve_device(config.device)
    model = build_network(state["model_name"], tuple(state["image_shape"]), state["num_classes"], config, device)
    model.load_state_dict(state["state"])
    checkpoints = [Checkpoint(c["epoch"], c["learning_rate"], c["state"], c["steps"]) for c in state["checkpoints"]]
    task = task_from(state["task"].get("kind", "image"), state["task"]["mean"], state["task"]["std"])
    return TrainedModel(model=model.eval(), task=task,
                        config=config, model_name=state["model_name"], device=device,
                        num_classes=state["num_classes"], checkpoints=checkpoints, history=state["history"],
                        seconds=state["seconds"], notes=state.get("notes", []))


def train_in_stages(dataset: Dataset, config: TrainConfig, stages: StageStore | None, *,
                    progress: Progress) -> TrainedModel:
    """:func:`engine.training.train`, or the model a previous run saved for this data and recipe."""
    if stages is None:
        return train(dataset, config, progress=progress)
    codec = Codec(lambda trained: _encode_trained(trained, dataset.image_shape), _decode_trained)
    return stages.fetch("train", training_key(dataset, config), lambda: train(dataset, config, progress=progress),
                        codec)


# -- scorer stages: objects that know their own state, arrays ------------------------------------

def state_codec(decode: Callable[[dict], T]) -> Codec[T]:
    """The codec of an object that knows its own state: ``value.to_state()`` out, ``decode(state)`` back."""
    return Codec(lambda value: value.to_state(), decode)


ARRAY = Codec(lambda array: {"array": torch.from_numpy(np.ascontiguousarray(array))},
              lambda state: state["array"].numpy())



# -- row stages: an N×D array written chunk by chunk into a memory map, resumable at any chunk -------

def fetch_rows(store: StageStore | None, stage: str, key: str, n: int, compute: Callable[[int, int], np.ndarray], *,
               chunk_rows: int, dtype: np.dtype, label: str | None = None,
               progress: Progress | None = None) -> np.ndarray:
    """An ``n``-row array, ``compute(lo, hi)`` giving rows ``lo:hi``: without a store, computed into
    memory; with one, the memory-mapped ``<stage>-<key>.npy`` a previous run finished, else written
    chunk by chunk into ``.partial.npy`` beside a record of the chunks done (each saved after its rows
    are flushed), so a run killed at any chunk resumes at the first missing one, and renamed into
    place when complete. Returns a read-only memory map (or the array, without a store)."""
    label = label or stage
    chunks = [(lo, min(lo + chunk_rows, n)) for lo in range(0, n, chunk_rows)]
    if store is None:
        return np.concatenate([np.asarray(compute(lo, hi), dtype=dtype) for lo, hi in chunks])
    final = store.folder / f"{stage}-{key}.npy"
    if final.exists():
        try:
            rows = np.load(final, mmap_mode="r")
            if len(rows) == n:
                store.log.append((label, "reused"))
                return rows
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable stage file, computing it again (%s)", final, exc)
    store.folder.mkdir(parents=True, exist_ok=True)
    partial, record = final.with_suffix(".partial.npy"), final.with_suffix(".chunks.npy")
    done, table = _resume_rows(partial, record, n, len(chunks))
    resumed = int(done.sum())
    for k, (lo, hi) in enumerate(chunks):
        if done[k]:
            continue
        rows = np.asarray(compute(lo, hi))
        if table is None:
            table = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=(n, *rows.shape[1:]))
        table[lo:hi] = rows
        table.flush()
        done[k] = True
        _replace_atomically(record, done)
        if progress is not None:
            progress(hi, n, f"{label}: {hi:,} of {n:,} rows saved")
    del table
    os.replace(partial, final)
    record.unlink(missing_ok=True)
    _fsync_folder(store.folder)
    store.log.append((f"{label} ({resumed} of {len(chunks)} chunks resumed)" if resumed else label, "computed"))
    return np.load(final, mmap_mode="r")


def _resume_rows(partial: Path, record: Path, n: int, chunk_count: int) -> tuple[np.ndarray, np.memmap | None]:
    """The chunks a killed run saved, and its table opened for writing; nothing when there is none."""
    try:
        done = np.load(record)
        table = np.load(partial, mmap_mode="r+")
        if done.shape == (chunk_count,) and done.dtype == bool and len(table) == n:
            return done, table
    except (OSError, ValueError):
        pass
    return np.zeros(chunk_count, dtype=bool), None


def _replace_atomically(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}{_TEMPORARY}")
    with open(temporary, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)

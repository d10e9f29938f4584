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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from engine.config import TrainConfig
from engine.data import Dataset
from engine.device import resolve_device
from engine.distributed import LOCAL, Distributed
from engine.errors import InfluenceLensError
from engine.progress import Progress
from engine.sources import is_lazy
from engine.start import build_network
from engine.task import task_from
from engine.training import Checkpoint, TrainedModel, train

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
            # "learning_rate": the stored key predates the field's name (mean_learning_rate); files keep it
            "checkpoints": [{"epoch": c.epoch, "learning_rate": c.mean_learning_rate, "state": c.state,
                             "steps": c.steps} for c in trained.checkpoints]}


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
                    progress: Progress, distributed: Distributed = LOCAL) -> TrainedModel:
    """:func:`engine.training.train`, or the model a previous run saved for this data and recipe."""
    def fresh() -> TrainedModel:
        return train(dataset, config, progress=progress, distributed=distributed)

    if stages is None:
        return fresh()
    codec = Codec(lambda trained: _encode_trained(trained, dataset.image_shape), _decode_trained)
    key = training_key(dataset, config)
    _agreed(stages.path("train", key).exists(), stages.path("train", key), distributed)
    return stages.fetch("train", key, fresh, codec)


# -- scorer stages: objects that know their own state, arrays ------------------------------------

def state_codec(decode: Callable[[dict], T]) -> Codec[T]:
    """The codec of an object that knows its own state: ``value.to_state()`` out, ``decode(state)`` back."""
    return Codec(lambda value: value.to_state(), decode)


ARRAY = Codec(lambda array: {"array": torch.from_numpy(np.ascontiguousarray(array))},
              lambda state: state["array"].numpy())



# -- row stages: an N×D array written chunk by chunk into a memory map, resumable at any chunk -------

def fetch_rows(store: StageStore | None, stage: str, key: str, n: int, compute: Callable[[int, int], np.ndarray], *,
               chunk_rows: int, dtype: np.dtype, label: str | None = None, progress: Progress | None = None,
               distributed: Distributed = LOCAL) -> np.ndarray:
    """An ``n``-row array, ``compute(lo, hi)`` giving rows ``lo:hi``.

    Without a store, computed into memory (each rank computes its chunks, all gathered). With one,
    the memory-mapped ``<stage>-<key>.npy`` a previous run finished; else the rows are written chunk
    by chunk into ``.partial.npy``, a marker file saved after each chunk's rows are flushed, so a run
    killed at any chunk resumes at the chunks without a marker; once every chunk is there the file is
    renamed into place. Chunk k is computed by rank k mod K: under torchrun the ranks write their own
    chunks into the one file, which then lies in a folder every rank sees (one machine, or a shared
    filesystem). Returns a read-only memory map (or the array, without a store).
    """
    label = label or stage
    chunks = [(lo, min(lo + chunk_rows, n)) for lo in range(0, n, chunk_rows)]
    mine = [k for k in range(len(chunks)) if k % distributed.world_size == distributed.rank]
    if store is None:
        parts = {k: np.asarray(compute(*chunks[k]), dtype=dtype) for k in mine}
        gathered = {k: part for ranks in distributed.gather_objects(parts) for k, part in ranks.items()}
        return np.concatenate([gathered[k] for k in range(len(chunks))])
    final = store.folder / f"{stage}-{key}.npy"
    if _agreed(final.exists(), final, distributed):
        try:
            rows = np.load(final, mmap_mode="r")
            if len(rows) == n:
                store.log.append((label, "reused"))
                return rows
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable stage file, computing it again (%s)", final, exc)
    store.folder.mkdir(parents=True, exist_ok=True)
    partial = final.with_suffix(".partial.npy")

    def marker(k: int) -> Path:
        return final.with_suffix(f".chunk-{k}-of-{len(chunks)}")

    def write(table: np.memmap, k: int, rows: np.ndarray) -> None:
        table[chunks[k][0]:chunks[k][1]] = rows
        table.flush()
        _replace_atomically(marker(k), np.zeros(0))
        if progress is not None:
            progress(chunks[k][1], n, f"{label}: rows {chunks[k][0]:,}-{chunks[k][1]:,} of {n:,} saved")

    table = _open_partial(partial, n) if marker(0).exists() else None
    resumed = sum(marker(k).exists() for k in range(len(chunks))) if table is not None else 0
    if table is None and distributed.is_main:  # the first chunk fixes the width: rank 0 creates the file
        rows = np.asarray(compute(*chunks[0]))
        table = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=(n, *rows.shape[1:]))
        write(table, 0, rows)
    distributed.all_reduce_sum(torch.zeros(1))  # every rank waits for the file
    table = table if table is not None else _open_partial(partial, n)
    for k in mine:
        if not marker(k).exists():
            write(table, k, np.asarray(compute(*chunks[k])))
    del table
    distributed.all_reduce_sum(torch.zeros(1))  # every chunk written
    if distributed.is_main:
        os.replace(partial, final)
        for k in range(len(chunks)):
            marker(k).unlink(missing_ok=True)
        _fsync_folder(store.folder)
    distributed.all_reduce_sum(torch.zeros(1))
    store.log.append((f"{label} ({resumed} of {len(chunks)} chunks resumed)" if resumed else label, "computed"))
    return np.load(final, mmap_mode="r")


class RowStream:
    """A ``compute(lo, hi)`` for :func:`fetch_rows` that takes its rows from one pass of batches
    (``batches_from(lo)``: ``(positions, rows)`` from row ``lo`` to the end) instead of a new pass per
    chunk: the pass's DataLoader workers start once and decode ahead across chunk boundaries, while a
    chunk is written. A chunk that does not follow the last one (a resumed run, another rank's chunk)
    starts a new pass there. With batches that divide the chunks, every batch holds the rows it held
    when each chunk had a pass of its own, so the rows are the same bit for bit."""

    def __init__(self, batches_from: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]):
        self.batches_from = batches_from
        self.batches: Iterator[tuple[np.ndarray, np.ndarray]] | None = None
        self.next_row = -1  # the row ``ready`` starts at
        self.ready: list[np.ndarray] = []  # rows computed and not yet handed out

    def __call__(self, lo: int, hi: int) -> np.ndarray:
        if lo != self.next_row:
            self.batches, self.next_row, self.ready = self.batches_from(lo), lo, []
        while sum(map(len, self.ready)) < hi - lo:
            self.ready.append(next(self.batches)[1])
        rows = np.concatenate(self.ready)
        self.ready, self.next_row = [rows[hi - lo:]], hi
        return rows[:hi - lo]


def _open_partial(partial: Path, n: int) -> np.memmap | None:
    """A killed run's table, opened for writing; None when there is none (or it is not whole)."""
    try:
        table = np.load(partial, mmap_mode="r+")
        return table if len(table) == n else None
    except (OSError, ValueError):
        return None


def _agreed(found: bool, path: Path, distributed: Distributed) -> bool:
    """Whether every rank found a stage file: a run under torchrun keeps its workspace where every rank
    sees it, else ranks would disagree on what to compute and wait on each other forever."""
    count = int(distributed.all_reduce_sum(torch.tensor(int(found))))
    if 0 < count < distributed.world_size:
        raise InfluenceLensError(f"{path}: {count} of {distributed.world_size} ranks see this stage file; a "
                                 "distributed run keeps its workspace in a folder every rank sees (one machine, or "
                                 "a shared filesystem)")
    return bool(count)


def _replace_atomically(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}{_TEMPORARY}")
    with open(temporary, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)

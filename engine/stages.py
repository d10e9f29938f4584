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
import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from engine.backbones import build_network
from engine.curvature import EKFAC, LastLayerCurvature, _LayerBasis
from engine.data import Dataset
from engine.device import resolve_device
from engine.finetune import FinetunedModel
from engine.progress import Progress
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
            for array in (ds.images, ds.labels, ds.index):
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
        except OSError as exc:
            log.warning("%s: could not save this stage, the run goes on without it (%s)", path, exc)
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
            "checkpoints": [{"epoch": c.epoch, "learning_rate": c.learning_rate, "state": c.state}
                            for c in trained.checkpoints]}


def _decode_trained(state: dict) -> TrainedModel:
    config = TrainConfig(**state["config"])
    device = resolve_device(config.device)
    model = build_network(state["model_name"], tuple(state["image_shape"]), state["num_classes"], config, device)
    model.load_state_dict(state["state"])
    checkpoints = [Checkpoint(c["epoch"], c["learning_rate"], c["state"]) for c in state["checkpoints"]]
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


# -- scorer stages: the fine-tuned model, curvature, arrays ---------------------------------------

def finetuned_codec(trained: TrainedModel) -> Codec[FinetunedModel]:
    """θ̃ as its weights and summary; loaded into a copy of the trained model's architecture."""
    def encode(finetuned: FinetunedModel) -> dict:
        return {"state": _cpu_state(finetuned.model),
                **{f.name: getattr(finetuned, f.name) for f in fields(finetuned) if f.name != "model"}}

    def decode(state: dict) -> FinetunedModel:
        model = copy.deepcopy(trained.model)
        model.load_state_dict(state.pop("state"))
        return FinetunedModel(model.eval(), **state)

    return Codec(encode, decode)


def curvature_codec(model: nn.Module, device: torch.device) -> Codec[LastLayerCurvature | EKFAC]:
    """The exact head curvature (its Cholesky factor) or EK-FAC's bases, re-attached to ``model``'s
    layers by name (EK-FAC scores run through the model it was fitted on)."""
    def encode(curvature: LastLayerCurvature | EKFAC) -> dict:
        if isinstance(curvature, LastLayerCurvature):
            return {"kind": "last", "cholesky": curvature.cholesky.cpu(), "damping": curvature.damping,
                    "bias": curvature.bias, "num_classes": curvature.num_classes}
        return {"kind": "ekfac", "names": list(curvature.names),
                "bases": [{"q_a": b.q_a.cpu(), "q_s": b.q_s.cpu(), "eigenvalues": b.eigenvalues.cpu(),
                           "damping": b.damping} for b in curvature.bases.values()]}

    def decode(state: dict) -> LastLayerCurvature | EKFAC:
        if state["kind"] == "last":
            return LastLayerCurvature(state["cholesky"].to(device), state["damping"], state["bias"],
                                      state["num_classes"])
        modules = dict(model.named_modules())
        bases = {modules[name]: _LayerBasis(b["q_a"].to(device), b["q_s"].to(device), b["eigenvalues"].to(device),
                                            b["damping"])
                 for name, b in zip(state["names"], state["bases"], strict=True)}
        return EKFAC(model, bases, state["names"])

    return Codec(encode, decode)


ARRAY = Codec(lambda array: {"array": torch.from_numpy(np.ascontiguousarray(array))},
              lambda state: state["array"].numpy())


"""Start from a network you have: built-in weights, a TorchScript backbone, a timm model, or embeddings.

Two roads. ``freeze="none"`` trains every layer from the given weights (the trainer builds the
network with :func:`start_model`). ``freeze="backbone"`` (the default whenever a start is given, and
the only road for a TorchScript backbone or embeddings) runs the backbone once per dataset, keeps
its N×D features as a stage of a resumable run (:mod:`engine.stages`), and trains the head alone
(:class:`engine.models.LinearHead`) on them. The training loss is then convex in the head's
parameters and its GGN is its Hessian: the scorers are told (``ScoringContext.head_only``) and each
result's ``trained_part`` says what that means for its method (exact only with the ``last`` head
curvature; EK-FAC approximates it). Every other method runs on the head too (cleanlab's folds
retrain the head).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from engine.data import Dataset
from engine.device import resolve_device
from engine.distributed import LOCAL, Distributed
from engine.errors import DataError, InfluenceLensError, OptionError
from engine.models import HEAD_MODEL, build_model, choose_model
from engine.progress import Progress, no_progress
from engine.sources import LazyImages, array_rows, batches, inference_batch
from engine.task import ImageTask

if TYPE_CHECKING:
    from engine.stages import StageStore
    from engine.training import TrainConfig

FREEZE_CHOICES = ("backbone", "none")
TIMM_PREFIX = "timm:"
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
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 2, 4096  # --image-size's range (engine.runs.RunSettings)


def is_timm(model: str | None) -> bool:
    return bool(model) and model.startswith(TIMM_PREFIX)


def has_start(config: TrainConfig) -> bool:
    """Whether the run starts from a network (or features) the user gave, not from scratch."""
    return bool(config.weights or config.backbone or config.embeddings or is_timm(config.model))


def head_only(config: TrainConfig) -> bool:
    """True on the frozen-feature path: features computed once, only a linear head trained."""
    return bool(config.backbone or config.embeddings) or (has_start(config) and config.freeze != "none")


def check_start(config: TrainConfig) -> None:
    """Refuse combinations that cannot work, and files that are not there, before any work."""
    if config.freeze is not None and config.freeze not in FREEZE_CHOICES:
        raise OptionError("freeze", config.freeze, FREEZE_CHOICES)
    if config.freeze is not None and not has_start(config):
        raise InfluenceLensError(f"--freeze {config.freeze} needs a network to start from: give --weights, "
                                 "--backbone, --model timm:NAME or --embeddings")
    if config.pretrained and not is_timm(config.model):
        raise InfluenceLensError("--pretrained applies to --model timm:NAME (use --weights FILE for a built-in model)")
    if config.backbone and config.embeddings:
        raise InfluenceLensError("give either --backbone or --embeddings, not both")
    if (config.backbone or config.embeddings) and (config.weights or is_timm(config.model)):
        raise InfluenceLensError("--weights and --model timm:NAME start a network; --backbone and --embeddings "
                                 "bring their own features: choose one")
    if (config.backbone or config.embeddings) and config.freeze == "none":
        raise InfluenceLensError("--backbone and --embeddings train the head alone; --freeze none needs --weights "
                                 "for a built-in model or --model timm:NAME")
    for option, path in (("weights", config.weights), ("backbone", config.backbone),
                         ("embeddings", config.embeddings)):
        if path:
            check_start_file(path, f"--{option}")


def check_start_file(path: str, option: str) -> None:
    """The file exists and is a regular file (a folder or a FIFO named as a file says so; a FIFO would block)."""
    file = Path(path)
    if file.is_dir():
        raise DataError(f"{path}: {option} is a folder; give the file itself")
    if file.exists() and not file.is_file():
        raise DataError(f"{path}: {option} is not a regular file (a FIFO, device or socket)")
    if not file.is_file():
        raise DataError(f"{path}: {option} file not found")


def head_config(config: TrainConfig) -> TrainConfig:
    """The recipe of the head trained on feature rows (what made the features is in their fingerprint)."""
    return replace(config, model=HEAD_MODEL, weights=None, backbone=None, embeddings=None, pretrained=False,
                   freeze=None)


def file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# -- weights for the built-in architectures -------------------------------------------------------

def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from ``.safetensors`` or a ``.pt`` read with ``weights_only=True`` (no pickle
    code runs); a ``{"state_dict": ...}`` wrapper and DDP's ``module.`` prefix are accepted."""
    if Path(path).suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InfluenceLensError(f"{path}: reading .safetensors needs the safetensors package: "
                                     "pip install -e '.[weights]' (or save a .pt state_dict)") from None
        try:
            state = load_file(path)
        except Exception as exc:  # the format's own errors: a bad header, a truncated file
            raise DataError(f"{path}: not a readable .safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle refused (not plain tensors), a zip error, not a torch file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise DataError(f"{path}: not a readable state_dict (torch.load with weights_only=True: {first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    for name, tensor in state.items():  # else training from it fails later, blaming the learning rate
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DataError(f"{path}: tensor {name!r} contains NaN or infinite values; these weights cannot be "
                            "trained from")
    return {k.removeprefix("module."): v for k, v in state.items()}


def fit_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str, model_name: str) -> list[str]:
    """Load ``state`` into ``model``: a head for another class count is left new (said in the returned
    notes); any other tensor that is missing, extra or of another shape is a :class:`DataError` naming it."""
    own = model.state_dict()
    notes = []
    head = state.get("head.weight")
    classes = own["head.weight"].shape[0]
    if head is not None and own["head.weight"].shape[1:] == head.shape[1:] and head.shape[0] != classes:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        notes.append(f"{path}: the file's head has {head.shape[0]} classes, the data {own['head.weight'].shape[0]}: "
                     "the head is replaced by a new one")
    for name, tensor in own.items():
        if name.startswith("head.") and name not in state and notes:
            continue
        if name not in state:
            raise DataError(f"{path}: tensor {name!r} of the {model_name} model is missing from the file "
                            "(weights for another architecture?)")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise DataError(f"{path}: tensor {name!r} has shape {tuple(state[name].shape)} in the file, the "
                            f"{model_name} model for this data needs {tuple(tensor.shape)}")
    extra = [k for k in state if k not in own]
    if extra:
        raise DataError(f"{path}: tensor {extra[0]!r} is not part of the {model_name} model "
                        f"({len(extra)} such; weights for another architecture?)")
    model.load_state_dict(state, strict=False)
    return notes


# -- networks -------------------------------------------------------------------------------------

class BackboneClassifier(nn.Module):
    """A feature extractor with the tool's own linear head (timm models, fine-tuned whole)."""

    def __init__(self, body: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def timm_body(name: str, *, pretrained: bool, weights: str | None) -> nn.Module:
    """timm's model ``name`` without its classifier (pooled features out). Imported lazily: timm is an
    optional extra. Weights come through timm's cache, or from ``weights`` when given."""
    try:
        import timm
    except Exception as exc:  # not installed, or its torchvision does not import beside this torch
        raise InfluenceLensError(f"--model timm:{name} needs the timm package, which does not import here: "
                                 f"pip install -e '.[timm]' ({exc.__class__.__name__}: {exc})") from None
    if name not in timm.list_models(pretrained=False):
        raise InfluenceLensError(f"timm has no model {name!r} (timm.list_models() lists them)")
    options = {"pretrained": pretrained or weights is not None, "num_classes": 0}
    if weights is not None:
        options["pretrained_cfg_overlay"] = {"file": str(weights)}
    try:
        return timm.create_model(name, **options)
    except Exception as exc:  # offline: the hub download fails with an OSError / HTTP error of its own
        raise InfluenceLensError(
            f"timm:{name}: the pretrained weights could not be loaded ({exc.__class__.__name__}: {exc}). Offline, "
            f"download them where a network is (timm.create_model({name!r}, pretrained=True) fills "
            "~/.cache/huggingface/hub; copy that folder here, or set HF_HOME) or give the weights file "
            "with --weights FILE") from None


def timm_data_config(body: nn.Module) -> dict:
    import timm.data

    return timm.data.resolve_model_data_config(body)


def load_torchscript(path: str, device: torch.device) -> torch.jit.ScriptModule:
    """A TorchScript module (``torch.jit.save``): code and weights, no pickle."""
    try:
        with warnings.catch_warnings():  # torch marks TorchScript deprecated; it is still the no-pickle format
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(path, map_location=device)
    except Exception as exc:  # not a TorchScript archive (a pickled nn.Module, a state_dict, garbage)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise DataError(f"{path}: not a TorchScript module (save one with torch.jit.save(torch.jit.script(m), "
                        f"path)): {first}") from None
    return module.eval()


def backbone_size(config: TrainConfig) -> int | None:
    """The input size the start network expects (the default ``image_size``): timm's pretrained
    config, a TorchScript module's ``image_size`` attribute; None (images as loaded) otherwise."""
    if is_timm(config.model):
        body = timm_body(config.model[len(TIMM_PREFIX):], pretrained=False, weights=None)
        return int(timm_data_config(body)["input_size"][-1])
    if config.backbone:
        size = getattr(load_torchscript(config.backbone, torch.device("cpu")), "image_size", None)
        if size is None:
            return None
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not (
                math.isfinite(size) and size == int(size) and MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE):
            raise DataError(f"{config.backbone}: the module's image_size attribute is {size!r}; it must be a side "
                            f"length in pixels from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (or give --image-size)")
        return int(size)
    return None


def build_network(model_name: str, image_shape: tuple[int, ...], num_classes: int, config: TrainConfig,
                  device: torch.device) -> nn.Module:
    """The architecture a run trains (weights not loaded): built-in, the head alone, or timm with a head."""
    if is_timm(model_name):
        body = timm_body(model_name[len(TIMM_PREFIX):], pretrained=False, weights=None)
        return BackboneClassifier(body, body.num_features, num_classes).to(device)
    return build_model(model_name, image_shape, num_classes, device).to(device)


def start_model(model_name: str, dataset: Dataset, config: TrainConfig, device: torch.device) -> nn.Module:
    """The network training starts from: built fresh, or with the user's weights (``freeze="none"``)."""
    if is_timm(model_name):
        name = model_name[len(TIMM_PREFIX):]
        body = timm_body(name, pretrained=config.pretrained, weights=config.weights)
        return BackboneClassifier(body, body.num_features, dataset.num_classes).to(device)
    model = build_model(model_name, dataset.image_shape, dataset.num_classes, device)
    if config.weights and model_name != HEAD_MODEL:
        fit_weights(model, read_state_dict(config.weights), config.weights, model_name)
    return model.to(device)


def start_notes(config: TrainConfig, dataset: Dataset) -> list[str]:
    """Check the weights fit the built-in model for this data before any work; what loading them
    changes (a replaced head) as notes."""
    if not config.weights or is_timm(config.model):
        return []
    device = torch.device("cpu")
    name = choose_model(dataset.image_shape, resolve_device(config.device)) if config.model == "auto" else config.model
    model = build_model(name, dataset.image_shape, dataset.num_classes, device)
    notes = fit_weights(model, read_state_dict(config.weights), config.weights, name)
    return notes if config.freeze == "none" else []  # a frozen run trains a new head anyway


# -- the frozen-feature path ----------------------------------------------------------------------

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

    def embedding_rows(self, dataset: Dataset) -> LazyImages:
        """The user's embeddings of the dataset's rows: a view of the memory-mapped file, read per batch."""
        rows = read_embeddings(self.config.embeddings)
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
    from engine.stages import RowStream, digest, fetch_rows, fingerprint

    backbone = FrozenBackbone(config, train_set, resolve_device(config.device))
    identity = backbone.identity

    def as_features(dataset: Dataset | None) -> Dataset | None:
        if dataset is None:
            return None
        if config.embeddings:
            return replace(dataset, images=backbone.embedding_rows(dataset))

        stream = RowStream(lambda lo: backbone.feature_batches(dataset, lo, progress))

        def chunk(lo: int, hi: int) -> np.ndarray:
            return _as_stored(stream(lo, hi), where=config.backbone or config.weights or config.model)

        rows = fetch_rows(stages, "features", digest("features", identity, fingerprint(dataset)), len(dataset), chunk,
                          chunk_rows=FEATURE_CHUNK_ROWS, dtype=FEATURE_DTYPE,
                          label=f"features:{dataset.source or 'data'}", distributed=distributed)
        return replace(dataset, images=array_rows(rows, np.arange(len(rows))))

    return head_config(config), as_features(train_set), [as_features(d) for d in others]

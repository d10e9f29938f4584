"""The network a run starts from: a built-in architecture (fresh, or with the user's ``--weights``),
a timm model, or a TorchScript backbone; and the input size it expects.

The trainer builds its network here (:func:`start_model`); the stage store rebuilds a saved one
(:func:`build_network`); the frozen-feature stage (:mod:`engine.frozen`) runs one to make features.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from engine.config import TIMM_PREFIX, TrainConfig, is_timm
from engine.data import Dataset
from engine.device import resolve_device
from engine.errors import DataError, InfluenceLensError
from engine.models import HEAD_MODEL, build_model, choose_model

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 2, 4096  # --image-size's range (engine.runs.RunSettings)


def file_hash(path: str) -> str:
    """A short hash of a start file's bytes: stored features and models follow the file's content, not its name."""
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

"""Memory a run will ask for, estimated before it asks: refused above what the machine has.

A large ``--image-size`` on small images, or embeddings with hundreds of thousands of columns under a
curvature method, used to allocate first and fail (or swap) later. :func:`check_memory` compares an
estimate with the memory available now (``MemAvailable``, and a cgroup limit where one is set) and
refuses with both numbers; ``force`` tries anyway. The estimates count the big arrays only (the images
as loaded, the float input tensor, one batch's activations, the curvature matrices), so they are a
floor: a run refused here could not have succeeded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from engine.errors import InfluenceLensError
from engine.sources import memory_budget

CURVATURE_METHODS = ("if-last", "if-ekfac", "vm", "fvm")  # fit a head curvature: (C·D)² or D² numbers
# Eigendecompositions and their workspaces hold about three copies of a curvature matrix at once.
CURVATURE_COPIES = 3
BACKWARD_FACTOR = 3  # activations kept for the backward pass, their gradients, the optimizer's work


def available_bytes() -> int:
    """Memory this process can still take: ``MemAvailable`` (Linux), capped by a cgroup limit; the
    physical memory elsewhere."""
    values = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                values.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            values.append(int(text))
    if not values:
        try:
            values.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return 2**62
    return min(values)


def gib(size: float) -> str:
    return f"{size / 2**30:,.1f} GiB"


FORCE_HINT = "pass --force to try anyway"


def check_memory(need: float, what: str, *, force: bool = False, advice: str = "",
                 override: str | None = FORCE_HINT) -> None:
    """Refuse ``what`` when it needs more than the memory available now, unless ``force``; ``override``
    says how to try anyway (None where there is no way, e.g. on the dashboard)."""
    if force:
        return
    available = available_bytes()
    if need > available:
        raise InfluenceLensError(f"{what} needs about {gib(need)} of memory, more than the {gib(available)} "
                                 f"available on this machine" + "".join(f"; {part}" for part in (advice, override)
                                                                          if part))


def images_bytes(rows: int, image_shape: tuple[int, ...]) -> int:
    """The images as loaded (uint8) and as the trainer's float32 input tensor."""
    return rows * math.prod(image_shape) * (1 + 4)


def activation_bytes(model: torch.nn.Module, image_shape: tuple[int, ...], batch: int) -> int:
    """One training batch's activations, measured by running ``model`` on a shapeless (meta) batch."""
    channels = 1 if len(image_shape) == 2 else image_shape[2]
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * 4

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.to("meta")(torch.empty(batch, channels, *image_shape[:2], device="meta"))
    except Exception:  # an architecture that does not run on meta tensors: count the inputs alone
        total = 0
    finally:
        for hook in hooks:
            hook.remove()
    return total * BACKWARD_FACTOR


def curvature_bytes(features: int, classes: int, exact_limit: int) -> int:
    """A head curvature on D features and C classes: the exact GGN ((C·(D+1))²) up to ``exact_limit``,
    else EK-FAC's two factors ((D+1)² + C²), float64, a few copies."""
    side = classes * (features + 1)
    numbers = side**2 if side <= exact_limit else (features + 1) ** 2 + classes**2
    return numbers * 8 * CURVATURE_COPIES


def embedding_columns(path: str) -> int | None:
    """D of an N×D ``.npy`` from its header alone; None when it cannot be read (the loader says why)."""
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:
        return None
    return int(rows.shape[1]) if isinstance(rows, np.ndarray) and rows.ndim == 2 else None


def listed_rows(spec: str) -> int | None:
    """How many samples ``spec`` lists, without decoding an image; None where that is not cheap to know."""
    from engine.data import image_folder_files, manifest_files

    path = Path(spec)
    try:
        if path.is_dir():
            return len(image_folder_files(path)[0])
        if path.suffix.lower() == ".csv" and path.is_file():
            return len(manifest_files(path)[0])
        if path.suffix.lower() == ".npz" and path.is_file():
            with np.load(path, allow_pickle=False) as archive:
                return len(archive["labels"])
    except Exception:  # a bad file: the loader names it, with its own words
        return None
    return None


def check_loading(spec: str, image_size: int | None, *, force: bool = False,
                  override: str | None = FORCE_HINT) -> None:
    """Before loading with ``image_size``: every image becomes image_size² pixels (one byte each at the least)."""
    if image_size is None or spec == "sample" or str(spec).startswith("sample:"):
        return
    rows = listed_rows(spec)
    if rows:
        check_memory(rows * image_size**2, f"loading {rows:,} images of {spec} at --image-size {image_size}",
                     force=force, advice="choose a smaller --image-size", override=override)


def check_training(train_set, config, methods: list[str], *, force: bool = False,
                   override: str | None = FORCE_HINT) -> None:
    """Before training: the input tensor and one batch's activations (a network trained whole), and the
    head curvature of a curvature method on embeddings (D² numbers at the least)."""
    from engine.config import head_only
    from engine.curvature import MAX_EXACT_HEAD_DIM
    from engine.device import resolve_device
    from engine.models import build_model, choose_model

    if config.embeddings and any(m in CURVATURE_METHODS for m in methods):
        columns = embedding_columns(config.embeddings)
        if columns is not None:
            check_memory(curvature_bytes(columns, train_set.num_classes, MAX_EXACT_HEAD_DIM),
                         f"the head curvature of {', '.join(m for m in methods if m in CURVATURE_METHODS)} on "
                         f"{columns:,}-column embeddings", force=force,
                         advice="reduce the embeddings' dimension (e.g. PCA) or pick a method without curvature "
                                "(loss, margin, tracin-last, vm-loss)", override=override)
    if head_only(config) or train_set.holds_features:
        return
    shape = train_set.image_shape
    # the trainer holds the decoded images only up to the memory budget, else reads them per batch
    need = min(images_bytes(len(train_set), shape), memory_budget())
    name = config.model
    if name == "auto":
        name = choose_model(shape, resolve_device(config.device))
    if not name.startswith("timm:"):
        with torch.device("meta"):
            model = build_model(name, shape, train_set.num_classes, torch.device("meta"))
        need += activation_bytes(model, shape, min(config.batch_size, len(train_set)))
    check_memory(need, f"training on {len(train_set):,} images of {'×'.join(map(str, shape))}", force=force,
                 advice="choose a smaller --image-size", override=override)

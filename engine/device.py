"""The one place where a device name becomes a ``torch.device``."""

from __future__ import annotations

import torch

from engine.errors import InfluenceLensError, OptionError

DEVICE_NAMES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks the GPU when there is one; ``cuda`` without a GPU is an error, not a fallback."""
    if name not in DEVICE_NAMES:
        raise OptionError("device", name, DEVICE_NAMES)
    if name == "cuda" and not torch.cuda.is_available():
        raise InfluenceLensError("--device cuda was asked for, but no CUDA GPU is available here; "
                                 "use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

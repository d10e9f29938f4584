"""The registry of scoring methods that the CLI and the dashboard read."""

from __future__ import annotations

from engine.errors import OptionError
from engine.scorers.base import Scorer

_REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer available under its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"scorer {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def scorer_class(name: str) -> type[Scorer]:
    if name not in _REGISTRY:
        raise OptionError("method", name, available_methods())
    return _REGISTRY[name]


def make_scorer(name: str, settings=None) -> Scorer:
    """A fresh scorer by name (``settings`` of its ``Settings`` type, or defaults)."""
    return scorer_class(name)(settings)

"""Scoring methods; importing this package registers every one of them."""

from engine.scorers import confident_learning, loss, margin  # noqa: F401  (registration)
from engine.scorers import tracin  # noqa: F401  (registration)
from engine.scorers import flat_validation, influence  # noqa: F401  (registration)
from engine.scorers.base import Scorer, ScoreResult, ScoringContext
from engine.scorers.registry import available_methods, make_scorer, register, scorer_class

__all__ = ["Scorer", "ScoreResult", "ScoringContext", "available_methods", "make_scorer", "register", "scorer_class"]

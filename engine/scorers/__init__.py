"""Scoring methods; importing this package registers every one of them."""

from engine.scorers import confident_learning, flat_validation, influence, loss, margin, tracin  # noqa: F401
from engine.scorers.base import Scorer, ScoreResult, ScoringContext
from engine.scorers.registry import available_methods, make_scorer, register, scorer_class

__all__ = ["Scorer", "ScoreResult", "ScoringContext", "available_methods", "make_scorer", "register", "scorer_class"]

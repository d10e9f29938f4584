"""Scoring methods; importing this package registers every one of them."""

# Registration order is the order users see: baselines first, then the influence methods.
from engine.scorers import loss, margin, confident_learning, tracin, influence, flat_validation  # noqa: F401, I001
from engine.scorers.base import Scorer, ScoreResult, ScoringContext
from engine.scorers.registry import available_methods, make_scorer, register, scorer_class

__all__ = ["Scorer", "ScoreResult", "ScoringContext", "available_methods", "make_scorer", "register", "scorer_class"]

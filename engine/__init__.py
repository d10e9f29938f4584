"""influence-lens engine: find mislabeled training images with influence functions.

A pure library (no Streamlit): load a dataset, train a classifier with checkpoints, score every
training sample with any registered method (higher = more suspicious), measure, retrain.
"""

from engine.config import PRESETS, TrainConfig
from engine.data import Dataset, inject_noise, load_dataset, stratified_split
from engine.errors import DataError, InfluenceLensError, OptionError, TrainingError
from engine.metrics import detection_metrics, ranking, top_k
from engine.pipeline import ScoringRun, apply_decisions, retrain_comparison, score_methods, with_injected_noise
from engine.scorers import ScoreResult, available_methods, make_scorer
from engine.training import TrainedModel, evaluate, predict, train

__all__ = [
    "PRESETS", "DataError", "Dataset", "InfluenceLensError", "OptionError", "ScoreResult", "ScoringRun",
    "TrainConfig", "TrainedModel", "TrainingError", "apply_decisions", "available_methods", "detection_metrics",
    "evaluate", "inject_noise", "load_dataset", "make_scorer", "predict", "ranking", "retrain_comparison",
    "score_methods", "stratified_split", "top_k", "train", "with_injected_noise",
]

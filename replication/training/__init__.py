"""Training: one loop for every notebook, with pluggable loss terms and step callbacks, checkpoints and a cache."""
from replication.training.loop import LossTerm, Recipe, StepCallback, TrainConfig, TrainResult, evaluate, train, train_cached

__all__ = ["LossTerm", "Recipe", "StepCallback", "TrainConfig", "TrainResult", "evaluate", "train", "train_cached"]

"""Training: one loop for every notebook, with pluggable loss terms, checkpoints and a cache."""
from replication.training.loop import LossTerm, TrainConfig, TrainResult, evaluate, train, train_cached

__all__ = ["LossTerm", "TrainConfig", "TrainResult", "evaluate", "train", "train_cached"]

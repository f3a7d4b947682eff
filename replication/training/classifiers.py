"""Classifiers trained on a ConceptWorld (or ImageFolder) task, shared by every notebook via the cache.

Notebooks 00, 03 and 05 train the same kinds of baselines; going through `train_world_classifier`
with the same configuration returns the cached model instead of training it again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from replication.data.classification import ClassificationDataset
from replication.models.backbones import BackboneConfig
from replication.profiles import Profile
from replication.training.loop import LossTerm, TrainConfig, TrainResult, train_cached


def profile_configs(profile: Profile, *, seed: int, **model_overrides: Any) -> tuple[BackboneConfig, TrainConfig]:
    """The profile's [model] and [train] sections as configs, for one seed (and e.g. another arch)."""
    model = profile.build(BackboneConfig, "model", **model_overrides)
    train = profile.build(TrainConfig, "train", seed=seed)
    return model, train


def train_world_classifier(
    root: str | Path,
    model: BackboneConfig,
    config: TrainConfig,
    *,
    device: str | torch.device | None = None,
    loss_terms: Sequence[LossTerm] = (),
    loss_config: Any = None,
    kind: str = "classifier",
) -> TrainResult:
    """Train (or load from the cache) `model` on the dataset at `root`, validating on its val split."""
    train_set = ClassificationDataset(root, "train")
    val_set = ClassificationDataset(root, "val")
    return train_cached(
        kind,
        lambda: model.build(len(train_set.classes)),
        train_set,
        config=config,
        model_config=model,
        val_set=val_set,
        loss_terms=loss_terms,
        loss_config=loss_config,
        device=device,
    )


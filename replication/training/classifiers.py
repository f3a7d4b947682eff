"""Classifiers trained on a ConceptWorld (or ImageFolder) task, shared by every notebook via the cache.

Notebooks 00, 03 and 05 train the same kinds of baselines; going through `train_world_classifier`
with the same configuration returns the cached model instead of training it again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from replication.data.classification import ClassificationDataset
from replication.models.backbones import BackboneConfig
from replication.training.loop import Recipe, TrainConfig, TrainResult, train_cached


@dataclass(frozen=True)
class BaselineSettings:
    """Notebook 00's [baselines] section: the backbones trained from scratch on the world's task
    (`archs`, each the profile's [model] with `model_overrides[arch]` applied), the `layers` of each
    arch dissected across depth, and the rotation study's `rotation_layer`, `rotation_alphas` and
    `rotation_seed`."""

    archs: tuple[str, ...]
    layers: Mapping[str, Sequence[str]]
    rotation_layer: str
    rotation_alphas: tuple[float, ...]
    rotation_seed: int = 0
    model_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [arch for arch in self.archs if arch not in self.layers]
        if missing:
            raise ValueError(f"[baselines] layers lists no layers for {missing}; add layers.<arch> = [...] for each arch.")


@dataclass(frozen=True)
class ClassifierRecipe(Recipe):
    """A `BackboneConfig` network with `num_classes` outputs trained on the task loss alone."""

    model: BackboneConfig
    num_classes: int

    def build(self) -> nn.Module:
        return self.model.build(self.num_classes)

    def key(self, model: nn.Module) -> dict[str, Any]:
        return {"model": self.model, "loss": None}


def train_world_classifier(
    root: str | Path,
    model: BackboneConfig,
    config: TrainConfig,
    *,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train (or load from the cache) `model` on the dataset at `root`, validating on its val split."""
    train_set = ClassificationDataset(root, "train")
    val_set = ClassificationDataset(root, "val")
    recipe = ClassifierRecipe(model, len(train_set.classes))
    return train_cached("classifier", recipe, train_set, config=config, val_set=val_set, device=device)


def train_baselines(
    root: str | Path,
    settings: BaselineSettings,
    *,
    model: BackboneConfig,
    train: TrainConfig,
    seeds: Sequence[int],
    device: str | torch.device | None = None,
) -> tuple[dict[tuple[str, int], nn.Module], pd.DataFrame]:
    """Every arch of `settings` x every seed trained (or loaded from the cache) on the world at `root`.

    `model` and `train` are the profile's [model] and [train] sections; each arch gets its
    `model_overrides` and each run its seed. Returns ({(arch, seed): model}, one row per run with the
    last epoch's number, train and val accuracy).
    """
    models, rows = {}, []
    for arch in settings.archs:
        arch_config = dataclasses.replace(model, arch=arch, **settings.model_overrides.get(arch, {}))
        for seed in seeds:
            result = train_world_classifier(root, arch_config, dataclasses.replace(train, seed=seed), device=device)
            models[arch, seed] = result.model
            last = result.history.iloc[-1]
            rows.append({"arch": arch, "seed": seed, "epochs": int(last["epoch"]),
                         "train_acc": last["train_acc"], "val_acc": last["val_acc"]})
    return models, pd.DataFrame(rows)

"""Notebook 05's experiment: `NADSettings` (profile section [nad]) and the run steps, in order.

`prepare_network` (train or load one network per arch through the shared cache),
`search_paths_cached` (`search_paths` behind the configuration cache), `analyse_architecture`
(everything measured on one network: an `ArchitectureResult`), `class_groups` with
`similarity_by_group` and `misclassification_table` (the class hierarchy), and `dissect_locations`
(Network Dissection at the gate locations, for `similarity.path_concepts`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from replication import cache, runtime
from replication.analysis.features import dissect_layers
from replication.data.classification import ClassificationDataset
from replication.methods.gated_paths.gates import GateLocation
from replication.methods.gated_paths.images import Mosaic
from replication.methods.gated_paths.metrics import hit_rates, path_accuracy, summarize_hit_rates
from replication.methods.gated_paths.search import PathSearchConfig, PathSet, official_beta, search_paths
from replication.methods.gated_paths.similarity import (group_similarity, misclassification_ranks, path_diversity,
                                                        path_iou)
from replication.models.anatomy import connection_family
from replication.models.backbones import BackboneConfig
from replication.runtime import resolve_device
from replication.training.classifiers import train_world_classifier
from replication.training.loop import TrainConfig

@dataclass(frozen=True)
class NADSettings:
    """Notebook 05's settings, the profile section [nad].

    `archs`: one per connection type; `data_root`: an ImageFolder dataset instead of the profile's
    ConceptWorld (then the models need pretrained `weights` overrides); `max_classes`: the first
    classes only (spec open point 3: 100 for ImageNet; None = every class); `model_overrides[arch]` /
    `train_overrides[arch]` change the profile's [model] / [train] fields for that arch (an arch
    without overrides is the shared baseline of notebook 00). `search` (the table [nad.search]) is the
    `PathSearchConfig` of every arch, with beta from `official_beta(arch, beta_dataset)` unless
    `beta[arch]` is given (`search_config`). `*_images_per_class` cap the images used (None = all).
    `dissect_layers`: dissect only the last gate locations (None = all). `mosaic_scale`: mosaic side /
    image side (official 1: the 2x2 mosaic is resized to the input size; 2 keeps every quadrant at
    the training resolution) [I].
    """

    archs: tuple[str, ...] = ("vgg16_bn", "resnet18", "densenet121")
    data_root: str | None = None
    max_classes: int | None = None
    model_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    train_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    beta: Mapping[str, float] = field(default_factory=dict)
    beta_dataset: str = "imagenet"
    search: PathSearchConfig = PathSearchConfig()
    train_images_per_class: int | None = None
    val_images_per_class: int | None = None
    class_chunk: int | None = None
    n_mosaics: int = 100
    mosaic_seed: int = 0
    mosaic_scale: int = 2
    top_fraction: float = 0.1
    quantize_uint8: bool = True
    empty_iou: float = 1.0
    n_random_paths: int = 100
    dissect_layers: int | None = None

    def __post_init__(self) -> None:
        if self.dissect_layers is not None and self.dissect_layers < 1:
            raise ValueError(f"[nad] dissect_layers = {self.dissect_layers}: give at least 1 "
                             "(or leave it out to dissect every gate location).")

    def search_config(self, arch: str) -> PathSearchConfig:
        """`search` with the beta of `arch`: `beta[arch]` when given, else `official_beta(arch, beta_dataset)`."""
        beta = self.beta.get(arch)
        return dataclasses.replace(self.search, beta=official_beta(arch, self.beta_dataset) if beta is None else float(beta))

    def dissected_locations(self, locations: Sequence[GateLocation]) -> list[GateLocation]:
        """The gate locations whose units are dissected: the last `dissect_layers` of them (None = all)."""
        if self.dissect_layers is None:
            return list(locations)
        return list(locations[max(len(locations) - self.dissect_layers, 0):])


def prepare_network(settings: NADSettings, arch: str, root: str | Path, *, model_config: BackboneConfig,
                    train_config: TrainConfig, seed: int,
                    device: str | torch.device | None = None) -> tuple[nn.Module, dict[str, Any], pd.DataFrame | None]:
    """The network NAD disentangles for `arch`: pretrained from `weights`, or trained on `root` through
    the shared cache (`train_world_classifier`, so the [model] baseline is notebook 00's).

    `model_config` / `train_config` are the profile's [model] / [train]; `arch`, `seed` and the
    settings' overrides for `arch` are applied to them. Returns the frozen model in eval mode, a key
    identifying it (for `search_paths_cached`) and the training history (None for pretrained weights).
    """
    model_config = dataclasses.replace(model_config, arch=arch, **settings.model_overrides.get(arch, {}))
    train_config = dataclasses.replace(dataclasses.replace(train_config, seed=seed), **settings.train_overrides.get(arch, {}))
    train_set = ClassificationDataset(root, "train")
    key = {"model": model_config, "data": train_set.fingerprint}
    if model_config.weights:
        model, history = model_config.build(len(train_set.classes)), None
    else:
        result = train_world_classifier(root, model_config, train_config, device=device)
        model, history = result.model, result.history
        key["train"] = train_config
    model = model.to(resolve_device(device)).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, key, history


def search_paths_cached(model: nn.Module, locations: Sequence[GateLocation], class_images: Mapping[int, torch.Tensor],
                        classes: Sequence[int], *, config: PathSearchConfig, key: Any,
                        device: str | torch.device | None = None, class_chunk: int | None = None) -> PathSet:
    """`search_paths` behind the configuration cache; `key` identifies the model and the images."""
    folder = cache.stage_dir("nad_paths", {"key": key, "config": config, "classes": list(classes),
                                           "locations": [asdict(loc) for loc in locations],
                                           **runtime.compute_identity(device)})
    if cache.is_done(folder):
        return PathSet.load(folder / "paths.pt")
    paths = search_paths(model, locations, class_images, classes, config=config, device=device,
                         class_chunk=class_chunk)
    paths.save(folder / "paths.pt")
    cache.mark_done(folder, {"config": config, "classes": list(classes)})
    return paths


@dataclass
class ArchitectureResult:
    """Everything notebook 05 measures on one network."""

    arch: str
    family: str
    paths: PathSet
    accuracy: pd.DataFrame          # per class: original vs path accuracy, units kept (N1)
    hits: pd.DataFrame              # per (mosaic, quadrant, layer) hit and class, own paths (N4-N6)
    control_hits: pd.DataFrame      # the same with another mosaic class's path (the control of N4)
    hit_summary: pd.DataFrame       # per layer mean/std, depth
    control_summary: pd.DataFrame   # the same for the control
    similarity: torch.Tensor        # (K, K) path similarity (N7, hierarchy)
    empty_layers: int               # class pairs x layers where both paths were empty (IoU := empty_iou)
    misclassification: pd.DataFrame  # per misclassified val image: true, predicted, normalised rank (N7)

    @property
    def diversity(self) -> float:
        return path_diversity(self.similarity)


def analyse_architecture(model: nn.Module, arch: str, paths: PathSet, val_images: Mapping[int, torch.Tensor],
                         mosaic_source, mosaics: Sequence[Mosaic], settings: NADSettings, *, mosaic_size: int,
                         batch_size: int, device: str | torch.device | None = None) -> ArchitectureResult:
    """Path accuracy, hit rates (own paths and the shifted-path control), similarity and misclassification ranks."""
    accuracy = path_accuracy(model, paths, val_images, batch_size=batch_size, device=device)
    options = dict(mosaic_size=mosaic_size, top_fraction=settings.top_fraction,
                   quantize_uint8=settings.quantize_uint8, batch_size=batch_size, device=device)
    hits = hit_rates(model, paths, mosaic_source, mosaics, **options)
    control = hit_rates(model, paths, mosaic_source, mosaics, path_shift=1, **options)
    iou, empty = path_iou(paths.paths(), empty_value=settings.empty_iou)
    similarity = iou.mean(0)
    wrong = [(row.class_id, p) for row in accuracy.itertuples() for p in row.predicted
             if p != row.class_id and p in paths.classes]
    ranks = misclassification_ranks(similarity, paths.classes, [t for t, _ in wrong], [p for _, p in wrong]) \
        if wrong and len(paths.classes) >= 3 else np.zeros(0)
    misclassified = pd.DataFrame({"true": [t for t, _ in wrong], "predicted": [p for _, p in wrong], "rank": ranks})
    off_diagonal = ~torch.eye(len(paths.classes), dtype=torch.bool)
    return ArchitectureResult(arch, connection_family(model), paths, accuracy.drop(columns="predicted"), hits, control,
                              summarize_hit_rates(hits), summarize_hit_rates(control), similarity,
                              int(empty[:, off_diagonal].sum()) // 2, misclassified)


@dataclass(frozen=True)
class ClassGroups:
    """What groups the searched `classes` (lists in their order): `names`, `superclass` (index into the
    dataset's superclasses) and `scene`, plus each class's rule concepts (`concepts[class_id]`). An
    ImageFolder dataset has no rules: its concepts are empty and each class is its own scene."""

    classes: list[int]
    names: list[str]
    superclass: list[int]
    scene: list[str]
    concepts: dict[int, list[str]]

    def order(self) -> list[int]:
        """Positions in `classes` sorted by superclass, scene and class id (related classes side by side)."""
        return sorted(range(len(self.classes)), key=lambda i: (self.superclass[i], self.scene[i], self.classes[i]))


def class_groups(dataset: ClassificationDataset, classes: Sequence[int]) -> ClassGroups:
    """The `ClassGroups` of `classes` of `dataset` (scene and concepts from its class rules)."""
    names = [dataset.classes[c] for c in classes]
    return ClassGroups(classes=list(classes), names=names, superclass=[dataset.superclass_of[c] for c in classes],
                       scene=[dataset.rules[c].get("scene", name) for c, name in zip(classes, names)],
                       concepts={c: list(dataset.rules[c].values()) for c in classes})


def similarity_by_group(results: Mapping[str, ArchitectureResult], groups: ClassGroups) -> pd.DataFrame:
    """Per network and grouping (superclass, scene): mean path similarity of class pairs within vs
    between groups (`group_similarity`); the paths' classes must be `groups.classes`, in that order."""
    return pd.DataFrame([{"arch": arch, "grouping": name, **group_similarity(result.similarity, labels)}
                         for arch, result in results.items()
                         for name, labels in (("superclass", groups.superclass), ("scene", groups.scene))])


def misclassification_table(results: Mapping[str, ArchitectureResult], groups: ClassGroups) -> pd.DataFrame:
    """N7 per network: how many val images were misclassified, the mean normalised rank of their
    (true, predicted) path similarity with its standard error, and the share of them whose predicted
    class has the true class's superclass (NaN without misclassifications)."""
    superclass = dict(zip(groups.classes, groups.superclass))
    rows = []
    for arch, result in results.items():
        wrong = result.misclassification
        same = [superclass[t] == superclass[p] for t, p in zip(wrong["true"], wrong["predicted"])]
        rows.append({"arch": arch, "misclassified": len(wrong), "mean_rank": wrong["rank"].mean(),
                     "se": wrong["rank"].std(ddof=1) / np.sqrt(max(len(wrong), 1)),
                     "same_superclass": np.mean(same) if same else np.nan})
    return pd.DataFrame(rows)


def dissect_locations(model: nn.Module, locations: Sequence[GateLocation], dataset, *, quantile: float = 0.005,
                      iou_threshold: float = 0.04, batch_size: int = 64, device: str | torch.device | None = None,
                      feature_budget_bytes: int = 1 << 29) -> dict[str, pd.DataFrame]:
    """Network Dissection unit tables (label, iou, detector per channel) at every gate location, keyed by name.

    `analysis.features.dissect_layers` with locations for layers: one forward pass per group of
    locations whose features fit `feature_budget_bytes`.
    """
    dissections = dissect_layers(model, [loc.name for loc in locations], dataset, quantile=quantile,
                                 iou_threshold=iou_threshold, batch_size=batch_size, device=device,
                                 max_bytes=feature_budget_bytes)
    return {name: result.units for name, result in dissections.items()}

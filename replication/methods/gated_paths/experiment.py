"""Notebook 05's experiment: `NADSettings` (profile section [nad]) and the run steps, in order.

`load_class_images` (the searched classes and their images: `ClassImages`), `prepare_network` (train
or load one network per arch through the shared cache) and `prepare_networks` (every arch, with its
gate locations: `Network`), `search_paths_cached` (`search_paths` behind the configuration cache) and
`search_networks` (every network, timed), `analyse_architecture` (everything measured on one network:
an `ArchitectureResult`) and `analyse_networks`, `class_groups` with `similarity_by_group` and
`misclassification_table` (the class hierarchy), `dissect_locations` (Network Dissection at the gate
locations) and `concepts_on_paths` (`similarity.path_concepts` per network), and `save_paths`.
The notebook's tables, one function each: `placement_table`, `training_table`, `path_accuracy_table`,
`hit_rate_table`, `similarity_by_group`, `misclassification_table`, `diversity_table`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from replication import cache, runtime
from replication.analysis.dissection import DissectionConfig
from replication.analysis.features import dissect_layers
from replication.data.classification import ClassificationDataset
from replication.methods.gated_paths.gates import GateLocation, gate_locations
from replication.methods.gated_paths.images import Mosaic, images_by_class
from replication.methods.gated_paths.metrics import hit_rates, path_accuracy, summarize_hit_rates
from replication.methods.gated_paths.search import PathSearchConfig, PathSet, official_beta, search_paths
from replication.methods.gated_paths.similarity import (group_similarity, misclassification_ranks, path_concepts,
                                                        path_diversity, path_diversity_se, path_iou)
from replication.models.anatomy import connection_family
from replication.models.backbones import BackboneConfig
from replication.runtime import resolve_device
from replication.training.classifiers import train_world_classifier
from replication.training.loop import TrainConfig

@dataclass(frozen=True)
class NADSettings:
    """Notebook 05's settings, the profile section [nad].

    `archs`: one per connection type; `data_root`: the class folders (ImageFolder layout) of a
    profile that reads real data (`data.sources`; the models then need pretrained `weights`
    overrides), resized to `image_size` (None = as stored, ConceptWorld); `max_classes`: the first
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
    image_size: int | None = None
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


@dataclass(frozen=True)
class ClassImages:
    """The classes NAD searches and their images: the `train_set` / `val_set` splits, the searched
    `classes` and, per class, its `train` images (read by the search) and `val` images (path
    accuracy); `val_set` is also the source of the mosaics' tiles."""

    train_set: ClassificationDataset
    val_set: ClassificationDataset
    classes: list[int]
    train: dict[int, torch.Tensor]
    val: dict[int, torch.Tensor]

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one image (C, H, W): what the gate locations are placed for."""
        return tuple(self.train[self.classes[0]].shape[1:])


def load_class_images(settings: NADSettings, root: str | Path, *, batch_size: int) -> ClassImages:
    """The first `settings.max_classes` classes of the dataset at `root` with their images, capped at
    `train_images_per_class` / `val_images_per_class` per class, resized to `settings.image_size`."""
    train_set = ClassificationDataset(root, "train", image_size=settings.image_size)
    val_set = ClassificationDataset(root, "val", image_size=settings.image_size)
    classes = list(range(len(train_set.classes)))[: settings.max_classes]
    return ClassImages(train_set, val_set, classes,
                       train=images_by_class(train_set, train_set.targets, classes, batch_size=batch_size,
                                             max_per_class=settings.train_images_per_class),
                       val=images_by_class(val_set, val_set.targets, classes, batch_size=batch_size,
                                           max_per_class=settings.val_images_per_class))


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
    train_set = ClassificationDataset(root, "train", image_size=settings.image_size)
    key = {"model": model_config, "data": train_set.fingerprint}
    if not model_config.weights and train_set.layout != "conceptworld":
        raise ValueError(f"[nad] arch {arch} has no weights and only ConceptWorld networks are trained here; set "
                         f"model_overrides.{arch}.weights to a pretrained file for the class folders at {root}.")
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


@dataclass(frozen=True)
class Network:
    """One network NAD disentangles: the frozen `model`, the `key` identifying it (for
    `search_paths_cached`), its training `history` (None for pretrained weights) and its gate `locations`."""

    model: nn.Module
    key: dict[str, Any]
    history: pd.DataFrame | None
    locations: list[GateLocation]


def prepare_networks(settings: NADSettings, root: str | Path, image_shape: Sequence[int], *,
                     model_config: BackboneConfig, train_config: TrainConfig, seed: int,
                     device: str | torch.device | None = None) -> dict[str, Network]:
    """`prepare_network` for every arch of `settings`, each with its gate locations for images of `image_shape`."""
    networks = {}
    for arch in settings.archs:
        model, key, history = prepare_network(settings, arch, root, model_config=model_config,
                                              train_config=train_config, seed=seed, device=device)
        networks[arch] = Network(model, key, history, gate_locations(model, image_shape))
    return networks


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


def search_networks(networks: Mapping[str, Network], images: ClassImages, settings: NADSettings, *,
                    device: str | torch.device | None = None) -> tuple[dict[str, PathSet], dict[str, float]]:
    """The class paths of every network (`search_paths_cached` on the training images, each arch with
    its `settings.search_config`) and the seconds each search took (about 0 when cached)."""
    paths, seconds = {}, {}
    for arch, network in networks.items():
        start = time.perf_counter()
        paths[arch] = search_paths_cached(network.model, network.locations, images.train, images.classes,
                                          config=settings.search_config(arch),
                                          key={**network.key, "images_per_class": settings.train_images_per_class},
                                          device=device, class_chunk=settings.class_chunk)
        seconds[arch] = time.perf_counter() - start
    return paths, seconds


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


def analyse_networks(networks: Mapping[str, Network], paths: Mapping[str, PathSet], images: ClassImages,
                     mosaics: Sequence[Mosaic], settings: NADSettings, *, mosaic_size: int, batch_size: int,
                     device: str | torch.device | None = None) -> dict[str, ArchitectureResult]:
    """`analyse_architecture` of every network whose `paths` were searched: path accuracy on the
    validation images, hit rates on `mosaics` of validation images."""
    return {arch: analyse_architecture(networks[arch].model, arch, paths[arch], images.val, images.val_set, mosaics,
                                       settings, mosaic_size=mosaic_size, batch_size=batch_size, device=device)
            for arch in paths}


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


def dissect_locations(model: nn.Module, locations: Sequence[GateLocation], dataset, *, dissection: DissectionConfig,
                      device: str | torch.device | None = None,
                      feature_budget_bytes: int = 1 << 29) -> dict[str, pd.DataFrame]:
    """Network Dissection unit tables (label, iou, detector per channel) at every gate location, keyed by name.

    `analysis.features.dissect_layers` with locations for layers and the `dissection` settings: one
    forward pass per group of locations whose features fit `feature_budget_bytes`.
    """
    dissections = dissect_layers(model, [loc.name for loc in locations], dataset, config=dissection, device=device,
                                 max_bytes=feature_budget_bytes)
    return {name: result.units for name, result in dissections.items()}


def concepts_on_paths(networks: Mapping[str, Network], paths: Mapping[str, PathSet], dataset, groups: ClassGroups,
                      settings: NADSettings, *, seed: int, dissection: DissectionConfig,
                      device: str | torch.device | None = None) -> dict[str, pd.DataFrame]:
    """Per network, `path_concepts` of its class paths (v1's concepts along paths, N2): its
    `settings.dissected_locations` dissected on the Broden-format `dataset` with the `dissection`
    settings, each class's own concepts from `groups`, `settings.n_random_paths` random unit sets
    drawn with `seed`."""
    units = {arch: dissect_locations(networks[arch].model, settings.dissected_locations(networks[arch].locations),
                                     dataset, dissection=dissection, device=device)
             for arch in paths}
    return {arch: path_concepts(paths[arch], units[arch], groups.concepts, n_random=settings.n_random_paths, seed=seed)
            for arch in paths}


def save_paths(paths: Mapping[str, PathSet], folder: str | Path) -> None:
    """Each network's class paths as `folder/paths_<arch>.pt`."""
    for arch, path_set in paths.items():
        path_set.save(Path(folder) / f"paths_{arch}.pt")


def placement_table(networks: Mapping[str, Network]) -> pd.DataFrame:
    """Per network: its connection family, the number of gates, the units they gate, and each gate's
    channels and spatial size (space-separated, in forward order)."""
    return pd.DataFrame([{"arch": arch, "family": connection_family(network.model), "gates": len(network.locations),
                          "units": sum(loc.channels for loc in network.locations),
                          "channels": " ".join(str(loc.channels) for loc in network.locations),
                          "spatial": " ".join(str(loc.height) for loc in network.locations)}
                         for arch, network in networks.items()])


def training_table(networks: Mapping[str, Network]) -> pd.DataFrame:
    """Per network: the last epoch's validation accuracy (rounded to 3 places) and the epochs trained
    (NaN and 0 for pretrained weights)."""
    return pd.DataFrame([{"arch": arch, "val_accuracy": round(float(network.history["val_acc"].iloc[-1]), 3)
                          if network.history is not None else np.nan,
                          "epochs": len(network.history) if network.history is not None else 0}
                         for arch, network in networks.items()])


def path_accuracy_table(results: Mapping[str, ArchitectureResult]) -> pd.DataFrame:
    """N1 / N3 per network, means over classes: accuracy of the original network and of the class
    paths, the fraction of units kept, and the class pairs x layers whose paths were both empty."""
    return pd.DataFrame([{"arch": arch, "original_accuracy": r.accuracy["original_accuracy"].mean(),
                          "path_accuracy": r.accuracy["path_accuracy"].mean(),
                          "units_kept": r.accuracy["units_kept"].mean(), "empty_layer_pairs": r.empty_layers}
                         for arch, r in results.items()])


def hit_rate_table(results: Mapping[str, ArchitectureResult]) -> pd.DataFrame:
    """N4-N6: every network's hit-rate summary per gate location, with the shifted-path control's
    hit rate beside it (`control`); rows keep each summary's index."""
    return pd.concat([r.hit_summary.assign(arch=arch, control=r.control_summary["hit_rate"])
                      for arch, r in results.items()])[
        ["arch", "layer", "location", "depth", "hit_rate", "hit_std", "control", "n_mosaics", "empty_maps"]]


def diversity_table(results: Mapping[str, ArchitectureResult], concepts: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """N2 per network of `concepts` (`concepts_on_paths`): path diversity with its jackknife SE and
    the per-class means of the concepts-on-paths columns."""
    return pd.DataFrame([{"arch": arch, "path_diversity": results[arch].diversity,
                          "diversity_se": path_diversity_se(results[arch].similarity),
                          **table.drop(columns="class_id").mean().to_dict()} for arch, table in concepts.items()])

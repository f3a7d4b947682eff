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
from scipy import stats
from torch import nn

from replication import cache, runtime
from replication.analysis.dissection import DissectionConfig
from replication.analysis.features import dissect_layers
from replication.data.classification import ClassificationDataset
from replication.methods.gated_paths.gates import GateLocation, gate_locations
from replication.methods.gated_paths.images import Mosaic, images_by_class
from replication.methods.gated_paths.metrics import hit_rates, path_accuracy, summarize_hit_rates
from replication.methods.gated_paths.search import (PathSearchConfig, PathSet, extend_search, official_beta,
                                                    search_paths, stopped_by_rule)
from replication.methods.gated_paths.similarity import (group_similarity, misclassification_ranks, path_concepts,
                                                        path_diversity, path_diversity_se, path_iou, path_stability,
                                                        random_path_diversity)
from replication.models.anatomy import connection_family
from replication.reporting.claims import cluster_means
from replication.models.backbones import BackboneConfig
from replication.models.pretrained import PRETRAINED, imagenet_classifier, spec_of
from replication.runtime import resolve_device
from replication.training.classifiers import RecipeSearch, plateaued, select_recipe, train_world_classifier
from replication.training.loop import TrainConfig

@dataclass(frozen=True)
class NADSettings:
    """Notebook 05's settings, the profile section [nad].

    `archs`: one per connection type; `data_root`: the class folders (ImageFolder layout) of a
    profile that reads real data (`data.sources`; the models then need pretrained `weights`
    overrides), resized to `image_size` (None = as stored, ConceptWorld); `max_classes`: the first
    classes only (spec open point 3: 100 for ImageNet; None = every class); `model_overrides[arch]` /
    `train_overrides[arch]` change the profile's [model] / [train] fields for that arch (an arch
    without overrides is the shared baseline of notebook 00); `recipe_from[arch]`: the arch whose
    searched recipe `arch` is trained with (`training_recipes`). `search` (the table [nad.search]) is the
    `PathSearchConfig` of every arch, with beta from `official_beta(arch, beta_dataset)` unless
    `beta[arch]` is given (`search_config`); `search_stages`: lower epoch caps at which the searches
    are also cached, so that a higher cap continues them (`search_paths_cached`).
    `*_images_per_class` cap the images used (None = all).
    `dissect_layers`: dissect only the last gate locations (None = all). `mosaic_scale`: mosaic side /
    image side (official 1: the 2x2 mosaic is resized to the input size; 2 keeps every quadrant at
    the training resolution) [I]. `networks_per_arch`: how many networks of each arch are trained
    alike (the first runtime seeds; `networks_of[arch]` overrides it), so that networks of one
    connection type give the null of N6; a pretrained arch is always one network.
    `stability_seeds`: further search seeds run on the first network of each of `stability_archs`
    (None = every arch) for path stability, on the classes `stability_classes` (None = all; a
    class's path does not depend on which classes are searched with it). beta check [I]: with a
    `beta_grid`, the first network of each arch is searched for `beta_epochs` on the classes
    `beta_classes` at every grid value, and the arch's beta is the smallest whose paths keep at most `beta_max_kept` of the units
    (the largest when none does; `calibrate_betas`); an explicit `beta[arch]` skips the check.
    """

    archs: tuple[str, ...] = ("vgg16_bn", "resnet18", "densenet121")
    data_root: str | None = None
    image_size: int | None = None
    max_classes: int | None = None
    model_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    train_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    recipe_from: Mapping[str, str] = field(default_factory=dict)
    beta: Mapping[str, float] = field(default_factory=dict)
    beta_dataset: str = "imagenet"
    search: PathSearchConfig = PathSearchConfig()
    search_stages: tuple[int, ...] = ()
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
    networks_per_arch: int = 1
    networks_of: Mapping[str, int] = field(default_factory=dict)
    stability_seeds: tuple[int, ...] = ()
    stability_archs: tuple[str, ...] | None = None
    stability_classes: tuple[int, ...] | None = None
    beta_grid: tuple[float, ...] = ()
    beta_classes: tuple[int, ...] = (0, 1, 2)
    beta_epochs: int = 20
    beta_max_kept: float = 0.5

    def __post_init__(self) -> None:
        if self.networks_per_arch < 1 or any(n < 1 for n in self.networks_of.values()):
            raise ValueError(f"[nad] networks_per_arch = {self.networks_per_arch}, networks_of = {dict(self.networks_of)}: "
                             "every arch needs at least one network.")
        if self.dissect_layers is not None and self.dissect_layers < 1:
            raise ValueError(f"[nad] dissect_layers = {self.dissect_layers}: give at least 1 "
                             "(or leave it out to dissect every gate location).")

    def search_config(self, arch: str) -> PathSearchConfig:
        """`search` with the beta of `arch`: `beta[arch]` when given, else `official_beta(arch, beta_dataset)`."""
        beta = self.beta.get(arch)
        return dataclasses.replace(self.search, beta=official_beta(arch, self.beta_dataset) if beta is None else float(beta))

    def calibrating(self, arch: str) -> bool:
        """Whether `arch`'s beta comes from the beta check (a grid is given and no explicit beta)."""
        return bool(self.beta_grid) and arch not in self.beta

    def network_seeds(self, arch: str, seeds: Sequence[int]) -> list[int]:
        """The runtime seeds `arch`'s networks are trained with (the first `networks_of[arch]` or
        `networks_per_arch`); an error when the profile lists fewer seeds."""
        wanted = self.networks_of.get(arch, self.networks_per_arch)
        if wanted > len(seeds):
            raise ValueError(f"[nad] asks for {wanted} networks of {arch} but [runtime] seeds lists {len(seeds)}: "
                             f"{list(seeds)}; add seeds or lower networks_per_arch.")
        return list(seeds[:wanted])

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
    """The network NAD disentangles for `arch`: pretrained from `weights`; on real class folders, an arch
    of `pretrained.PRETRAINED` as the ImageNet classifier it is (`imagenet_classifier`: the folders must be
    ImageNet's 1000 classes, whose sorted wnids are its logits' order); or trained on `root` through the
    shared cache (`train_world_classifier`, so the [model] baseline is notebook 00's; a PRETRAINED arch is
    fine-tuned there).

    `model_config` / `train_config` are the profile's [model] / [train]; `arch`, `seed` and the
    settings' overrides for `arch` are applied to them. Returns the frozen model in eval mode, a key
    identifying it (for `search_paths_cached`) and the training history (None for pretrained weights).
    """
    model_config = dataclasses.replace(model_config, arch=arch, **settings.model_overrides.get(arch, {}))
    train_config = dataclasses.replace(dataclasses.replace(train_config, seed=seed), **settings.train_overrides.get(arch, {}))
    train_set = ClassificationDataset(root, "train", image_size=settings.image_size)
    key = {"model": model_config, "data": train_set.fingerprint}
    real = train_set.layout != "conceptworld"
    if real and arch in PRETRAINED:
        imagenet = spec_of(arch).num_classes
        if len(train_set.classes) != imagenet:
            raise ValueError(f"[nad] arch {arch} is analysed as its ImageNet classifier on real data, but {root} has "
                             f"{len(train_set.classes)} class folders, not ImageNet's {imagenet} (one per wnid, "
                             "as ILSVRC's train folder); use [nad] max_classes to analyse fewer.")
        model, history = imagenet_classifier(arch, weights=model_config.weights), None
    elif not model_config.weights and real:
        raise ValueError(f"[nad] arch {arch} has no weights and only ConceptWorld networks are trained here; set "
                         f"model_overrides.{arch}.weights to a pretrained file for the class folders at {root}.")
    elif model_config.weights:
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
    """One network NAD disentangles: the frozen `model`, its `arch` and training `seed`, the `key`
    identifying it (for `search_paths_cached`), its training `history` (None for pretrained weights)
    and its gate `locations`. Networks are named `<arch>_s<seed>` (`network_name`)."""

    model: nn.Module
    arch: str
    seed: int
    key: dict[str, Any]
    history: pd.DataFrame | None
    locations: list[GateLocation]


def network_name(arch: str, seed: int) -> str:
    return f"{arch}_s{seed}"


def training_recipes(settings: NADSettings, root: str | Path, *, model_config: BackboneConfig,
                     train_config: TrainConfig, search: RecipeSearch | None,
                     device: str | torch.device | None = None) -> dict[str, TrainConfig]:
    """Per arch, the recipe its networks are trained with: notebook 00's procedure (`select_recipe`:
    `search`'s candidates scored on a tuning split, for the arch's model config) so that every
    network is trained alike and its baseline is shared through the cache), or `train_config` (the
    profile's [train]) when `search` is None (real data) or the arch is a pretrained network that is
    fine-tuned (`pretrained.PRETRAINED`: a from-scratch recipe search does not apply) [I]; then the
    arch's `train_overrides`.
    An arch of `settings.recipe_from` takes the recipe chosen for the arch it names instead of its own
    search (CPU time) [I]."""
    chosen = {}

    def searched(arch: str) -> TrainConfig:
        if arch not in chosen:
            config = dataclasses.replace(model_config, arch=arch, **settings.model_overrides.get(arch, {}))
            chosen[arch], _ = select_recipe(root, config, train_config, search, device=device)
        return chosen[arch]

    recipes = {}
    for arch in settings.archs:
        recipe = train_config
        if search is not None and arch not in PRETRAINED:
            recipe = searched(settings.recipe_from.get(arch, arch))
        recipes[arch] = dataclasses.replace(recipe, **settings.train_overrides.get(arch, {}))
    return recipes


def prepare_networks(settings: NADSettings, root: str | Path, image_shape: Sequence[int], *,
                     model_config: BackboneConfig, recipes: Mapping[str, TrainConfig], seeds: Sequence[int],
                     device: str | torch.device | None = None) -> dict[str, Network]:
    """`prepare_network` for every arch of `settings` with its recipe (`training_recipes`) and each of
    its `settings.network_seeds` (one network for pretrained weights), with its gate locations for
    images of `image_shape`, by name."""
    networks = {}
    for arch in settings.archs:
        pretrained = bool(settings.model_overrides.get(arch, {}).get("weights") or model_config.weights)
        for seed in settings.network_seeds(arch, seeds)[:1] if pretrained else settings.network_seeds(arch, seeds):
            model, key, history = prepare_network(dataclasses.replace(settings, train_overrides={}), arch, root,
                                                  model_config=model_config, train_config=recipes[arch], seed=seed,
                                                  device=device)
            networks[network_name(arch, seed)] = Network(model, arch, seed, key, history, gate_locations(model, image_shape))
    return networks


def search_paths_cached(model: nn.Module, locations: Sequence[GateLocation], class_images: Mapping[int, torch.Tensor],
                        classes: Sequence[int], *, config: PathSearchConfig, key: Any,
                        device: str | torch.device | None = None, class_chunk: int | None = None,
                        epoch_stages: Sequence[int] = ()) -> PathSet:
    """`search_paths` behind the configuration cache; `key` identifies the model and the images.

    `epoch_stages`: lower epoch caps at which the search is also cached on its way to `config.epochs`
    (cache-or-continue per stage): the search starts from the highest cached stage and goes on with
    `extend_search`, which gives the same paths as one search with the final cap. Raising the cap
    thus costs only the classes the lower cap stopped.
    """
    caps = sorted({cap for cap in epoch_stages if cap < config.epochs} | {config.epochs})
    folders = {cap: cache.stage_dir("nad_paths", {"key": key, "config": dataclasses.replace(config, epochs=cap),
                                                  "classes": list(classes),
                                                  "locations": [asdict(loc) for loc in locations],
                                                  **runtime.compute_identity(device)}) for cap in caps}
    done = [cap for cap in caps if cache.is_done(folders[cap])]
    paths = PathSet.load(folders[done[-1]] / "paths.pt") if done else None
    for cap in caps[caps.index(done[-1]) + 1:] if done else caps:
        staged = dataclasses.replace(config, epochs=cap)
        if paths is None:
            paths = search_paths(model, locations, class_images, classes, config=staged, device=device,
                                 class_chunk=class_chunk)
        else:
            paths = extend_search(model, locations, class_images, paths, config=staged, device=device,
                                  class_chunk=class_chunk)
        paths.save(folders[cap] / "paths.pt")
        cache.mark_done(folders[cap], {"config": staged, "classes": list(classes)})
    return paths


def first_networks(networks: Mapping[str, Network]) -> dict[str, str]:
    """Per arch, the name of its first network (the one the beta check, the stability searches and
    the placement table read)."""
    first: dict[str, str] = {}
    for name, network in networks.items():
        first.setdefault(network.arch, name)
    return first


def _key(network: Network, settings: NADSettings) -> dict[str, Any]:
    return {**network.key, "images_per_class": settings.train_images_per_class}


def calibrate_betas(networks: Mapping[str, Network], images: ClassImages, settings: NADSettings, *,
                    device: str | torch.device | None = None) -> tuple[NADSettings, pd.DataFrame]:
    """The beta check: for each arch that `settings.calibrating`, short searches of its first network
    on `beta_classes` at every `beta_grid` value (cached), and the smallest beta whose paths keep at
    most `beta_max_kept` of the units (mean over those classes; the largest beta when none does).
    Returns the settings with those betas set and one row per (arch, beta): units kept, the path's
    own-class accuracy on the val images and the original's, and whether it was chosen."""
    rows, chosen = [], {}
    for arch, name in first_networks(networks).items():
        network = networks[name]
        if not settings.calibrating(arch):
            continue
        classes = [c for c in settings.beta_classes if c in images.train]
        try:
            official = official_beta(arch, settings.beta_dataset)
        except ValueError:  # an arch of no official connection type
            official = None
        for beta in sorted(settings.beta_grid):
            config = dataclasses.replace(settings.search, beta=beta, epochs=settings.beta_epochs, stop_flip_rate=None)
            found = search_paths_cached(network.model, network.locations, images.train, classes, config=config,
                                        key=_key(network, settings), device=device, class_chunk=settings.class_chunk)
            accuracy = path_accuracy(network.model, found, {c: images.val[c] for c in classes}, device=device)
            rows.append({"arch": arch, "beta": beta, "official": beta == official,
                         "classes": len(classes), "epochs": settings.beta_epochs,
                         "units_kept": accuracy["units_kept"].mean(), "path_accuracy": accuracy["path_accuracy"].mean(),
                         "original_accuracy": accuracy["original_accuracy"].mean()})
        table = pd.DataFrame([r for r in rows if r["arch"] == arch])
        sparse = table[table["units_kept"] <= settings.beta_max_kept]
        chosen[arch] = float(sparse["beta"].min() if len(sparse) else table["beta"].max())
    frame = pd.DataFrame(rows, columns=["arch", "beta", "official", "classes", "epochs", "units_kept", "path_accuracy",
                                        "original_accuracy"])
    frame["chosen"] = [chosen.get(a) == b for a, b in zip(frame["arch"], frame["beta"])]
    return dataclasses.replace(settings, beta={**settings.beta, **chosen}), frame


@dataclass
class Searches:
    """The path searches of notebook 05: each network's `paths` (search seed of [nad.search]), the
    `repeats` of the first network of each stability arch (that search and one per stability seed,
    on the stability classes)
    and the wall `seconds` of every network's searches (about 0 when cached)."""

    paths: dict[str, PathSet]
    repeats: dict[str, list[PathSet]]
    seconds: dict[str, float]


def search_networks(networks: Mapping[str, Network], images: ClassImages, settings: NADSettings, *,
                    device: str | torch.device | None = None) -> Searches:
    """The class paths of every network (`search_paths_cached` on the training images, each arch with
    its `settings.search_config`), and the first network of each of `settings.stability_archs`
    searched again with every `settings.stability_seeds`."""
    paths, repeats, seconds = {}, {}, {}
    first = first_networks(networks)
    for name, network in networks.items():
        start = time.perf_counter()
        config = settings.search_config(network.arch)
        repeated = first[network.arch] == name and (settings.stability_archs is None
                                                    or network.arch in settings.stability_archs)

        def search(seed: int, classes: Sequence[int]) -> PathSet:
            return search_paths_cached(network.model, network.locations, images.train, classes,
                                       config=dataclasses.replace(config, seed=seed), key=_key(network, settings),
                                       device=device, class_chunk=settings.class_chunk,
                                       epoch_stages=settings.search_stages)

        paths[name] = search(config.seed, images.classes)
        if repeated and settings.stability_seeds:
            classes = list(settings.stability_classes or images.classes)
            repeats[name] = [paths[name].subset(classes), *(search(seed, classes) for seed in settings.stability_seeds)]
        seconds[name] = time.perf_counter() - start
    return Searches(paths, repeats, seconds)


def convergence_table(networks: Mapping[str, Network], searches: Searches) -> pd.DataFrame:
    """Per network: the search's beta and stopping rule, steps and epochs per class (mean, max),
    the share of classes the stopping rule stopped (the rest ran to the epoch cap), the last epoch's
    flip rate, the share of path decisions still equal to the random initial ones and the units kept
    (means over classes): is the path the search's or its initialisation's? `minutes_this_run`: the
    search time spent in this run (0 when every stage came from the cache)."""
    rows = []
    for name, path_set in searches.paths.items():
        config, trace = path_set.config, path_set.trace
        per_class = trace.groupby("class_id").agg(steps=("steps", "sum"), epochs=("epoch", "max"))
        last = trace.sort_values("epoch").groupby("class_id").tail(1)
        rows.append({"network": name, "beta": config["beta"], "stop_flip_rate": config.get("stop_flip_rate"),
                     "max_epochs": config["epochs"], "steps_mean": per_class["steps"].mean(),
                     "steps_max": per_class["steps"].max(), "epochs_max": per_class["epochs"].max(),
                     "stopped_by_rule": float(stopped_by_rule(trace, config).mean()),
                     "last_flip_rate": last["flip_rate"].mean(),
                     "init_agreement": path_set.init_agreement()["agreement"].mean(),
                     "units_kept": last["units_kept"].mean(),
                     "units_kept_min": last["units_kept"].min(), "units_kept_max": last["units_kept"].max(),
                     "minutes_this_run": searches.seconds[name] / 60})
    return pd.DataFrame(rows)


def stability_table(searches: Searches, *, n_random: int = 20, seed: int = 0, empty_iou: float = 1.0) -> pd.DataFrame:
    """Per network searched with several seeds: the classes compared, the mean over them of the path
    IoU between searches (`similarity.path_stability`) next to that of same-size random unit sets,
    and the searches' seeds."""
    rows = []
    for name, found in searches.repeats.items():
        table = path_stability(found, n_random=n_random, seed=seed, empty_value=empty_iou)
        rows.append({"network": name, "searches": len(found), "classes": len(table),
                     "search_seeds": " ".join(str(p.config["seed"]) for p in found),
                     "path_iou": table["stability"].mean(), "path_iou_min": table["stability"].min(),
                     "random_iou": table["random"].mean()})
    return pd.DataFrame(rows)


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
    return {name: analyse_architecture(networks[name].model, networks[name].arch, paths[name], images.val,
                                       images.val_set, mosaics, settings, mosaic_size=mosaic_size,
                                       batch_size=batch_size, device=device)
            for name in paths}


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
    return pd.DataFrame([{"network": network, "grouping": name, **group_similarity(result.similarity, labels)}
                         for network, result in results.items()
                         for name, labels in (("superclass", groups.superclass), ("scene", groups.scene))])


def misclassification_table(results: Mapping[str, ArchitectureResult], groups: ClassGroups) -> pd.DataFrame:
    """N7 per network: how many val images were misclassified and from how many true classes, the
    mean normalised rank of their (true, predicted) path similarity with its SE, both over true
    classes (images of one class share its path, so the class is the unit), and the share of them
    whose predicted class has the true class's superclass (NaN without misclassifications)."""
    superclass = dict(zip(groups.classes, groups.superclass))
    rows = []
    for name, result in results.items():
        wrong = result.misclassification
        same = [superclass[t] == superclass[p] for t, p in zip(wrong["true"], wrong["predicted"])]
        per_class = cluster_means(wrong["rank"], wrong["true"])
        rows.append({"network": name, "misclassified": len(wrong), "true_classes": len(per_class),
                     "mean_rank": per_class.mean() if len(per_class) else np.nan,
                     "se_over_classes": stats.sem(per_class) if len(per_class) > 1 else np.nan,
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
    """Per arch (its first network): its connection family, the number of gates, the units they gate,
    and each gate's channels and spatial size (space-separated, in forward order)."""
    first = {arch: networks[name] for arch, name in first_networks(networks).items()}
    return pd.DataFrame([{"arch": arch, "family": connection_family(network.model), "gates": len(network.locations),
                          "units": sum(loc.channels for loc in network.locations),
                          "channels": " ".join(str(loc.channels) for loc in network.locations),
                          "spatial": " ".join(str(loc.height) for loc in network.locations)}
                         for arch, network in first.items()])


def training_table(networks: Mapping[str, Network]) -> pd.DataFrame:
    """Per network: arch, seed, epochs trained, the last epoch's train and val accuracy (%), whether
    the val curve plateaued (`training.classifiers.plateaued`) and the training minutes its history
    recorded when it was trained (a cached network costs nothing in a later run; NaN without a
    `seconds` column); NaN and 0 epochs for pretrained weights."""
    rows = []
    for name, network in networks.items():
        history = network.history
        trained = history is not None and len(history) > 0
        rows.append({"network": name, "arch": network.arch, "seed": network.seed,
                     "epochs": len(history) if trained else 0,
                     "train_acc": 100 * float(history["train_acc"].iloc[-1]) if trained else np.nan,
                     "val_acc": 100 * float(history["val_acc"].iloc[-1]) if trained else np.nan,
                     "plateaued": plateaued(history) if trained else False,
                     "train_minutes": history["seconds"].sum() / 60 if trained and "seconds" in history else np.nan})
    return pd.DataFrame(rows)


def path_accuracy_table(results: Mapping[str, ArchitectureResult]) -> pd.DataFrame:
    """N1 / N3 per network, means over classes (`metrics.path_accuracy`): accuracy of the original
    network and of the class paths on their own class, the paths' agreement with the original, the
    share of other classes' images each labels as its class against the original's (specificity),
    the fraction of units kept, and the class pairs x layers whose paths were both empty."""
    columns = ["original_accuracy", "path_accuracy", "agreement", "original_false_positive", "path_false_positive",
               "units_kept"]
    return pd.DataFrame([{"network": name, **r.accuracy[columns].mean().to_dict(), "empty_layer_pairs": r.empty_layers}
                         for name, r in results.items()])


def hit_rate_table(results: Mapping[str, ArchitectureResult]) -> pd.DataFrame:
    """N4-N6: every network's hit-rate summary per gate location, with the shifted-path control's
    hit rate beside it (`control`); rows keep each summary's index."""
    return pd.concat([r.hit_summary.assign(network=name, control=r.control_summary["hit_rate"])
                      for name, r in results.items()])[
        ["network", "layer", "location", "depth", "hit_rate", "hit_std", "control", "n_mosaics", "empty_maps"]]


def diversity_table(results: Mapping[str, ArchitectureResult], concepts: Mapping[str, pd.DataFrame], *,
                    n_random: int = 100, seed: int = 0) -> pd.DataFrame:
    """N2 per network of `concepts` (`concepts_on_paths`): path diversity with its jackknife SE, the
    diversity of same-size random paths (mean and SD over `n_random` draws: what path sizes alone
    give) and the per-class means of the concepts-on-paths columns."""
    rows = []
    for name, table in concepts.items():
        random = random_path_diversity(results[name].paths.paths(), n_random=n_random, seed=seed)
        rows.append({"network": name, "path_diversity": results[name].diversity,
                     "diversity_se": path_diversity_se(results[name].similarity),
                     "random_diversity": random.mean(), "random_diversity_sd": random.std(ddof=1),
                     **table.drop(columns="class_id").mean().to_dict()})
    return pd.DataFrame(rows)

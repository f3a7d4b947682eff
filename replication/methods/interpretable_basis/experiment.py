"""Scoring a basis of one layer the way paper 04 does, through the shared dissection: dissect the
directions on the train split, label them there, dissect them again on the val split and read S¹/S²
(`score_basis`); the comparison of the four bases on one layer of a network (`compare_bases`); and
notebook 04's steps: its [uibe] settings (`UIBESettings`), the subject networks (`subject_networks`),
the comparison over networks and seeds (`run_comparisons`) and its tables.

Binarisation (shared spec section 5): learned detectors (UIBE, IBD) use their own rule on both splits
(`LinearDetectors`: w·a > t); the natural basis and rotations use the quantile rule, its thresholds
fitted on the train split and reused on val. Features come from `analysis.features.layer_features`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from replication.analysis.dissection import Dissection, DissectionConfig, dissect_features
from replication.analysis.features import DEFAULT_MAX_BYTES, layer_features
from replication.analysis.rotation import random_rotation
from replication.data.broden import BrodenDataset
from replication.data.sources import DataSources
from replication.data.subsets import seeded_subset
from replication.methods.interpretable_basis.detectors import LinearDetectors, derived_seed, pixel_matrix, shuffled_pixels
from replication.methods.interpretable_basis.ibd import IBDBasis, IBDConfig, cell_labels, fit_ibd
from replication.methods.interpretable_basis.metrics import (direction_table, one_hotness, s_by_category, s_integrands,
                                                             s_scores)
from replication.methods.interpretable_basis.planted import PlantedRun
from replication.methods.interpretable_basis.uibe import UIBEBasis, UIBEConfig, fit_uibe
from replication.models.backbones import BackboneConfig
from replication.models.pretrained import PRETRAINED, pretrained, spec_of
from replication.runtime import resolve_device
from replication.training.classifiers import BaselineSettings, train_baselines
from replication.training.loop import TrainConfig


@dataclass
class BasisScores:
    """One basis scored: both dissections, the per-direction `table` (labels from train, IoUs on both
    splits), S¹/S² (`scores`) and their per-category breakdown."""

    name: str
    train: Dissection
    val: Dissection
    table: pd.DataFrame
    scores: dict[str, float]
    by_category: pd.DataFrame


def score_basis(name: str, train_features: torch.Tensor, val_features: torch.Tensor, train_set, val_set, *,
                config: DissectionConfig, detectors: LinearDetectors | None = None,
                basis: torch.Tensor | None = None, labels=None, categories=None,
                device: str | torch.device | None = None, **options) -> BasisScores:
    """S¹/S² of a basis of one layer: `detectors` (own rule) or `basis` rows / the natural basis (None)
    under the quantile rule; `labels` fixes each direction's label (e.g. an IBD probe's concept)
    instead of the train argmax. `config` gives quantile, IoU threshold and batch size; `options`
    the shared dissection's options."""
    if detectors is not None and basis is not None:
        raise ValueError("pass either detectors (a learned rule) or basis (the quantile rule), not both.")
    settings = dict(categories=categories, device=device, layer=name, **config.dissect_keywords(), **options)
    if detectors is not None:
        train = dissect_features(train_features, train_set, **detectors.dissect_keywords(), **settings)
        val = dissect_features(val_features, val_set, **detectors.dissect_keywords(), **settings)
    else:
        train = dissect_features(train_features, train_set, basis=basis, **settings)
        val = dissect_features(val_features, val_set, basis=basis, thresholds=train.thresholds, **settings)
    table = direction_table(train, val, val_set, labels)
    return BasisScores(name, train, val, table, s_scores(table), s_by_category(table, xi=config.iou_threshold))


def scores_table(results: list[BasisScores]) -> pd.DataFrame:
    """One row per basis: S¹, S², directions, and the detectors / unique detectors at the IoU threshold."""
    return pd.DataFrame([{"basis": r.name, "directions": len(r.table), **r.scores,
                          **r.by_category.set_index("category").loc["total", ["detectors", "unique_detectors"]].to_dict()}
                         for r in results])


@dataclass(frozen=True)
class LayerData:
    """One layer of one network on both splits: its features (N × D × h × w, shared `layer_features`)
    and the train split's cell labels at the feature grid (IBD's targets)."""

    layer: str
    train_features: torch.Tensor
    val_features: torch.Tensor
    cells: torch.Tensor


def layer_data(model: nn.Module, layer: str, train_set, val_set, *, batch_size: int,
               device: str | torch.device | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> LayerData:
    """`layer`'s features on the train and val splits and the train cells' labels, computed once so
    that every basis and seed of `compare_bases` reads the same tensors."""
    keywords = dict(batch_size=batch_size, device=resolve_device(device), max_bytes=max_bytes)
    train_features = layer_features(model, [layer], train_set, **keywords)[layer]
    val_features = layer_features(model, [layer], val_set, **keywords)[layer]
    cells = cell_labels(train_set, tuple(train_features.shape[-2:]), batch_size=batch_size)
    return LayerData(layer, train_features, val_features, cells)


SHUFFLED = "UIBE on shuffled features"  # claim U1's null (`compare_bases`)


@dataclass
class BasisComparison:
    """Paper 04's comparison on one layer: `scores` per basis (natural, random rotation, UIBE, IBD),
    their `table` (S¹, S², counts at the IoU threshold) and `one_hot` (claim U1 on val pixels, with its
    null `SHUFFLED`), and the
    fitted `uibe` and `ibd` bases."""

    layer: str
    scores: dict[str, BasisScores]
    table: pd.DataFrame
    one_hot: pd.DataFrame
    uibe: UIBEBasis
    ibd: IBDBasis


def compare_bases(data: LayerData, train_set, val_set, *, config: DissectionConfig,
                  uibe: UIBEConfig = UIBEConfig(), ibd: IBDConfig = IBDConfig(), seed: int = 0, rotation_seed: int = 0,
                  categories=None, device: str | torch.device | None = None, **options) -> BasisComparison:
    """Fit UIBE (on the train split's pixels, `seed`) and IBD (train split, its own concepts as labels)
    on one layer's `data` (`layer_data`), and score them with the natural basis and a random rotation
    (`rotation_seed`) by `score_basis`. One-hotness on the val pixels: UIBE and IBD with their own
    logits, the natural basis and the rotation under UIBE's parametrisation with b and M fitted on
    train (`fit_uibe(basis=...)`), and the null of claim U1: UIBE fitted on the train pixels with every
    dimension shuffled across pixels (`shuffled_pixels`), its one-hotness read on val pixels shuffled alike."""
    device = resolve_device(device)
    train_pixels, val_pixels = pixel_matrix(data.train_features), pixel_matrix(data.val_features)
    dim = train_pixels.shape[1]
    rotation = random_rotation(dim, rotation_seed)
    fitted = fit_uibe(train_pixels, uibe, seed=seed, device=device)
    probes = fit_ibd(train_pixels, data.cells, train_set, ibd, seed=seed, device=device)
    features = (data.train_features, data.val_features, train_set, val_set)
    score = dict(config=config, categories=categories, device=device, **options)
    scores = {
        "natural": score_basis("natural", *features, **score),
        "random rotation": score_basis("random rotation", *features, basis=rotation, **score),
        "UIBE": score_basis("UIBE", *features, detectors=fitted.detectors(), **score),
        "IBD": score_basis("IBD", *features, detectors=probes.detectors(), labels=probes.labels, **score),
    }
    logits = {
        "natural": fit_uibe(train_pixels, uibe, seed=seed, device=device, basis=torch.eye(dim, dtype=torch.float64)),
        "random rotation": fit_uibe(train_pixels, uibe, seed=seed, device=device, basis=rotation),
        "UIBE": fitted,
    }
    chunk = config.batch_size * 64
    one_hot = [{"basis": name, **one_hotness(basis.logits(val_pixels, batch_size=chunk, device=device))}
               for name, basis in logits.items()]
    one_hot.append({"basis": "IBD", **one_hotness(probes.detectors().scores(val_pixels.double()).float())})
    null = fit_uibe(shuffled_pixels(train_pixels, derived_seed(seed, 2)), uibe, seed=seed, device=device)
    one_hot.append({"basis": SHUFFLED, **one_hotness(null.logits(shuffled_pixels(val_pixels, derived_seed(seed, 3)),
                                                                  batch_size=chunk, device=device))})
    return BasisComparison(data.layer, scores, scores_table(list(scores.values())), pd.DataFrame(one_hot), fitted, probes)


# ---------------------------------------------------------------- notebook 04
@dataclass(frozen=True)
class UIBESettings:
    """Notebook 04's [uibe] section: the `planted` test's repetitions; the subject `networks` (an arch
    of notebook 00's [baselines], trained on the world through the cache or loaded from its weights, or a
    `models.pretrained` name, used as it is) and the `layers` whose bases are compared; the Broden
    images used (`train_images` / `val_images` of each split, None = all, drawn with `subset_seed`);
    the basis `seeds` (the unit of replication: each fits UIBE and IBD and draws the random rotation);
    UIBE's and IBD's settings (`fit`, `ibd`); the numbers of directions I tried on the first network
    besides `fit.directions` (`directions_grid`, and I = D when `grid_full_rank`: spec open point 2);
    `data_root`: class folders (real data, `data.sources`)."""

    planted: PlantedRun = PlantedRun()
    networks: tuple[str, ...] = ("resnet18", "efficientnet_lite0")
    layers: Mapping[str, str] = field(default_factory=lambda: {"resnet18": "layer4", "efficientnet_lite0": "blocks.6"})
    train_images: int | None = None
    val_images: int | None = None
    subset_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    fit: UIBEConfig = UIBEConfig()
    ibd: IBDConfig = IBDConfig()
    directions_grid: tuple[int, ...] = (8, 32)
    grid_full_rank: bool = True
    data_root: str | None = None

    def __post_init__(self):
        missing = [name for name in self.networks if name not in self.layers]
        if missing:
            raise ValueError(f"[uibe] layers names no layer for {missing}; add layers.<network> = \"<module name>\".")
        if not self.networks or not self.seeds:
            raise ValueError(f"[uibe] needs at least one network and one seed; got networks={self.networks}, seeds={self.seeds}.")
        if any(count < 1 for count in self.directions_grid):
            raise ValueError(f"[uibe] directions_grid = {self.directions_grid}: every number of directions must be >= 1.")
        for name in ("train_images", "val_images"):
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise ValueError(f"[uibe] {name} = {getattr(self, name)}: give at least 2 images or leave it out (all).")


@dataclass
class SubjectNetwork:
    """A network whose `layer` the bases are fitted on, the Broden `train_set` / `val_set` at its own
    input size and normalisation, and where it comes from (`origin`, in words)."""

    name: str
    model: nn.Module
    layer: str
    train_set: object
    val_set: object
    origin: str


def subject_networks(settings: UIBESettings, sources: DataSources, baselines: BaselineSettings, *, model: BackboneConfig,
                     train: TrainConfig, seed: int, batch_size: int,
                     device: str | torch.device | None = None) -> dict[str, SubjectNetwork]:
    """The `settings.networks` in eval mode: a pretrained name as it is (its own input size and
    normalisation), any other name the [baselines] arch of notebook 00 for `seed` (`train_baselines`:
    the same cached network, or its `weights` file); each with its seeded Broden image subsets."""
    networks = {}
    for name in settings.networks:
        layer, image = settings.layers[name], {}
        if name in PRETRAINED:
            spec = spec_of(name)
            network, origin = pretrained(name, device=device), "ImageNet-trained, used as it is"
            image = dict(image_size=spec.input_size, mean=spec.mean, std=spec.std)
        else:
            only = dataclasses.replace(baselines, archs=(name,), layers={name: [layer]}, pretrained=(), rotation_layers={})
            trained = train_baselines(sources.classification, only, model=model, train=train, seeds=[seed],
                                      batch_size=batch_size, device=device)
            network = trained.models[name, seed].eval()
            origin = f"notebook 00's {name} (seed {seed}), val accuracy {trained.accuracy.val_acc.iloc[0]:.1f}%"
        splits = [seeded_subset(BrodenDataset(Path(sources.broden), split=split, **image), count, seed=settings.subset_seed)
                  for split, count in (("train", settings.train_images), ("val", settings.val_images))]
        networks[name] = SubjectNetwork(name, network, layer, *splits, origin)
    return networks


def network_table(networks: Mapping[str, SubjectNetwork], data: Mapping[str, LayerData]) -> pd.DataFrame:
    """One row per subject network: layer, origin, images and pixel vectors per split, dimension D."""
    return pd.DataFrame([{"network": name, "layer": n.layer, "origin": n.origin,
                          "train_images": len(n.train_set), "val_images": len(n.val_set),
                          "train_pixels": len(pixel_matrix(data[name].train_features)),
                          "val_pixels": len(pixel_matrix(data[name].val_features)),
                          "dim": data[name].train_features.shape[1]} for name, n in networks.items()])


@dataclass
class Comparisons:
    """`compare_bases` per network and basis seed (`runs[network, seed]`), with the long tables over
    them: `scores` (S¹, S², counts) and `one_hot` (one-hotness), one row per network, seed and basis."""

    runs: dict[tuple[str, int], BasisComparison]
    scores: pd.DataFrame
    one_hot: pd.DataFrame


def run_comparisons(networks: Mapping[str, SubjectNetwork], data: Mapping[str, LayerData], settings: UIBESettings, *,
                    config: DissectionConfig, device: str | torch.device | None = None) -> Comparisons:
    """`compare_bases` on every network's layer for every basis seed (UIBE, IBD and the random rotation
    all seeded with it)."""
    runs = {(name, seed): compare_bases(data[name], n.train_set, n.val_set, config=config, uibe=settings.fit,
                                        ibd=settings.ibd, seed=seed, rotation_seed=seed, device=device)
            for name, n in networks.items() for seed in settings.seeds}

    def long(attribute: str) -> pd.DataFrame:
        return pd.concat([getattr(run, attribute).assign(network=name, layer=run.layer, seed=seed)
                          for (name, seed), run in runs.items()], ignore_index=True)

    return Comparisons(runs, long("table"), long("one_hot"))


def seed_summary(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Mean and SD over seeds of `columns`, per network and basis (in first-seen order)."""
    return frame.groupby(["network", "basis"], sort=False)[list(columns)].agg(["mean", "std"])


def concepts_found(run: BasisComparison, *, xi: float = 0.04) -> pd.DataFrame:
    """Per concept detected at ξ on val by UIBE or IBD (labels from train): its category, how many
    UIBE directions carry it and their best val IoU, IBD's probe's val IoU, and which basis finds it."""
    found = {}
    for name in ("UIBE", "IBD"):
        table = run.scores[name].table
        table = table[(table.label_number >= 0) & (table.val_iou >= xi)]
        found[name] = table.groupby(["label", "category"]).val_iou.agg(["size", "max"])
    frame = (found["UIBE"].rename(columns={"size": "uibe_directions", "max": "uibe_best_iou"})
             .join(found["IBD"]["max"].rename("ibd_iou"), how="outer").reset_index()
             .rename(columns={"label": "concept"}))
    frame["uibe_directions"] = frame.uibe_directions.fillna(0).astype(int)
    uibe, ibd = frame.uibe_directions > 0, frame.ibd_iou.notna()
    frame["found_by"] = ["both" if u and i else "UIBE only" if u else "IBD only" for u, i in zip(uibe, ibd)]
    return frame.sort_values(["found_by", "category", "concept"], ignore_index=True)


def metric_reduction_check(comparisons: Comparisons, networks: Mapping[str, SubjectNetwork], *,
                           xi: float = 0.04) -> pd.DataFrame:
    """Claim U4 on every scored basis: labelled and scored on the same (val) dissection, S¹'s and S²'s
    integrands at ξ against Network Dissection's counts of detectors and unique detectors there."""
    rows = []
    for (name, seed), run in comparisons.runs.items():
        for basis, scores in run.scores.items():
            integrands = s_integrands(direction_table(scores.val, scores.val, networks[name].val_set), xi)
            counts = scores.val.summary.set_index("category").loc["total"]
            rows.append({"network": name, "seed": seed, "basis": basis,
                         "s1_integrand": integrands["detectors"], "nd_detectors": int(counts.detectors),
                         "s2_integrand": integrands["unique_detectors"], "nd_unique_detectors": int(counts.unique_detectors)})
    frame = pd.DataFrame(rows)
    frame["equal"] = (frame.s1_integrand == frame.nd_detectors) & (frame.s2_integrand == frame.nd_unique_detectors)
    return frame


def directions_grid(settings: UIBESettings, dim: int) -> list[int]:
    """The numbers of directions the sensitivity table tries on a layer of dimension `dim`: the grid
    (values above D dropped), the fitted I and, with `grid_full_rank`, I = D."""
    chosen = {*settings.directions_grid, settings.fit.directions or dim, *([dim] if settings.grid_full_rank else [])}
    return sorted(count for count in chosen if count <= dim)


def directions_sensitivity(data: LayerData, config: UIBEConfig, directions: Sequence[int | None], *, seed: int = 0,
                           batch_size: int = 65536, device: str | torch.device | None = None) -> pd.DataFrame:
    """UIBE fitted with each number of `directions` I (None: I = D) on one layer's train pixels, and its
    one-hotness on the val pixels: spec open point 2 (I is unknown), and where the objective collapses."""
    train_pixels, val_pixels = pixel_matrix(data.train_features), pixel_matrix(data.val_features)
    rows = []
    for count in directions:
        fitted = fit_uibe(train_pixels, dataclasses.replace(config, directions=count), seed=seed, device=device)
        rows.append({"directions": len(fitted.directions), "epochs": len(fitted.history), "bias": fitted.bias,
                     "margin": fitted.margin,
                     **one_hotness(fitted.logits(val_pixels, batch_size=batch_size, device=device))})
    return pd.DataFrame(rows)

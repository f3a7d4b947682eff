"""The notebook's experiments (spec sections 5-7), its `CGLSettings` and the cached training runs.

The synthetic task (Table 1) and classification with an AlexNet- and a VGG-style network (Tables
2-3: ConceptWorld, or real class folders and Broden under the `paper` profile), each trained with
weight decay, the block norm alone and full CGL, then dissected; the lambda sweep picks lambda_g =
lambda_s first. `synthetic_task` and `main_task` read their images.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn
from torch.utils.data import Dataset

from replication import cache
from replication.analysis.dissection import DissectionConfig
from replication.analysis.features import dissect_layers
from replication.data.broden import BrodenDataset
from replication.data.classification import ClassificationDataset
from replication.data.sources import DataSources
from replication.data.subsets import InMemoryDataset, InMemoryItems, seeded_indices, seeded_subset, split_indices
from replication.methods.concept_groups.groups import GROUPS
from replication.methods.concept_groups.layers import activation_layers, dissected_layers, grouped_layers
from replication.methods.concept_groups.losses import CGLConfig, cgl_loss_terms
from replication.methods.concept_groups.metrics import (
    dissection_tables,
    group_purity,
    group_statistics,
    ratio_of_unique_detectors,
    relevance_summary,
    relevance_table,
)
from replication.methods.concept_groups.receptive_field import check_choice
from replication.models.anatomy import conv_layers, producing_conv
from replication.models.backbones import build_backbone
from replication.models.small_cnns import TwoLayerCNN
from replication.training.classifiers import plateaued
from replication.training.loop import Recipe, TrainConfig, evaluate, predict, train_cached

VARIANTS = ("weight_decay", "block_norm", "cgl")
LAMBDA_BN_RULES = ("paper", "integrated")  # lambda_bn as published | scaled to the paper's integrated shrinkage [I]
# The official code's recipe [C] and the Places365-Standard training set it ran on (1,803,460 images [P]):
# the schedule against which `integrated_lr` measures a run's regularisation budget.
PAPER_SCHEDULE = TrainConfig(epochs=90, batch_size=256, lr=0.01, momentum=0.9, weight_decay=1e-4, schedule="step",
                             step_size=30)
PAPER_TRAIN_IMAGES = 1_803_460
VARIANT_LABELS = {"weight_decay": "weight decay", "block_norm": "R_bn", "cgl": "R_bn + L_g + L_s"}
SYNTHETIC_CATEGORIES = {"color": "color", "object": "shape", "part": "color_shape"}  # ConceptWorld -> Table 1


@dataclass(frozen=True)
class CGLSettings:
    """The notebook's settings: the `[cgl]` section of a profile. Tags as in the spec.

    Synthetic task: the paper's two-layer CNN (`synthetic_widths` 128, 256 [P]) on the `cgl_world`
    preset; epochs [U]. Main experiment: `archs` trained from scratch [P] at `widths` on 64-px
    ConceptWorld, `small_inputs` (one value per arch) removing early downsampling, or, when the
    profile reads real data (`data.sources`), on the class folders at `data_root` (ImageNet or
    Places365 [P]) resized to `image_size` (None = as stored). `train` (the table
    [cgl.train]) is the code's recipe (SGD, momentum 0.9, lr 0.01, batch 256, step schedule x0.1 every
    30 of 90 epochs [C]), its weight decay 1e-4 for the baseline and 0 with the block norm [C]
    (`train_config`); the synthetic task uses it for `synthetic_epochs` at `synthetic_lr`. lambda_bn
    5e-3 for AlexNet and 1e-3 for VGG16 [C]. lambda_g = lambda_s are not
    reported [U]: they are chosen from `lambda_grid` (spec 9.1) on `sweep_arch` by `select_lambda`,
    using a `tuning_fraction` of the training split held out (never the reported val split).
    `train_images` / `synthetic_train_images` cap the training splits and `dissection_images` the
    dissected val split (seeded subsets, None = all; a cap makes the run reduced); `n_seeds` /
    `n_synthetic_seeds` how many of `seeds` (None: the profile's runtime seeds) each experiment uses (the
    first ones); `main_variants` which variants the main experiment trains (the synthetic task trains
    all). The block norm acts on the conv layers with >= `min_group_size` filters in each of `groups`
    groups, L_g and L_s on those of them the code exposes (`grouped`) [I]; its weight follows
    `lambda_bn_rule` and `shrinkage_fraction` (`synthetic_shrinkage_fraction` for the synthetic CNN, None:
    the same; `lambda_bn`). G7 reads each unit's `top_images` most
    activating images.
    """

    synthetic_widths: tuple[int, int] = (128, 256)
    synthetic_epochs: int = 90
    synthetic_lr: float = 0.01
    synthetic_lambda_bn: float = 5e-3
    synthetic_global_pool: str = "max"
    n_synthetic_seeds: int = 3
    synthetic_train_images: int | None = None
    data_root: str | None = None
    image_size: int | None = None
    archs: tuple[str, ...] = ("alexnet", "vgg16")
    widths: tuple[float, ...] = (1.0, 1.0)
    small_inputs: tuple[bool, ...] = (True, True)
    train: TrainConfig = PAPER_SCHEDULE
    lambda_bn_alexnet: float = 5e-3
    lambda_bn_vgg16: float = 1e-3  # also for vgg16_bn
    lambda_bn_rule: str = "integrated"
    shrinkage_fraction: float = 1.0
    synthetic_shrinkage_fraction: float | None = None
    min_group_size: int = 12
    lambda_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    sweep_arch: str = "alexnet"
    tuning_fraction: float = 0.2
    accuracy_tolerance: float = 1.5
    train_images: int | None = None
    n_seeds: int = 3
    main_variants: tuple[str, ...] = VARIANTS
    seeds: tuple[int, ...] | None = None
    groups: int = GROUPS
    analysis_images: int = 256
    top_images: int = 10
    dissection_images: int | None = None

    def __post_init__(self):
        check_choice(self.lambda_bn_rule, LAMBDA_BN_RULES, "lambda_bn_rule")
        for name in ("shrinkage_fraction", "synthetic_shrinkage_fraction"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"[cgl] {name} = {value}: give the share (> 0) of the paper's integrated block-norm "
                                 "shrinkage to match.")
        if self.min_group_size < 2:
            raise ValueError(f"[cgl] min_group_size = {self.min_group_size}: within-group pairs need groups of >= 2 filters.")
        for variant in self.main_variants:
            check_choice(variant, VARIANTS, "main_variants")
        if not {"weight_decay", "cgl"} <= set(self.main_variants):
            raise ValueError(f"[cgl] main_variants {self.main_variants} must hold weight_decay and cgl "
                             "(the claims compare them).")
        for name in ("widths", "small_inputs"):
            if len(getattr(self, name)) != len(self.archs):
                raise ValueError(f"[cgl] {name} {getattr(self, name)} must give one value per arch {self.archs}.")

    def seed_list(self, profile_seeds: Sequence[int], count: int) -> tuple[int, ...]:
        """The first `count` of `seeds` (or of the profile's seeds when `seeds` is None)."""
        available = tuple(self.seeds if self.seeds is not None else profile_seeds)
        if count > len(available):
            raise ValueError(f"[cgl] asks for {count} seeds but has {len(available)} ({available}); list more in [cgl] seeds.")
        return available[:count]

    def width(self, arch: str) -> float:
        return self.widths[self.archs.index(arch)] if arch in self.archs else 1.0

    def small_input(self, arch: str) -> bool:
        return self.small_inputs[self.archs.index(arch)] if arch in self.archs else True

    def published_lambda_bn(self, arch: str) -> float:
        """lambda_bn of the code's runs for `arch` [C] (the synthetic CNN takes AlexNet's)."""
        return self.synthetic_lambda_bn if arch == "two_layer_cnn" else getattr(self, f"lambda_bn_{arch.removesuffix('_bn')}")

    def fraction(self, arch: str) -> float:
        """The share of the paper's integrated shrinkage that `arch`'s block norm matches."""
        if arch == "two_layer_cnn" and self.synthetic_shrinkage_fraction is not None:
            return self.synthetic_shrinkage_fraction
        return self.shrinkage_fraction

    def lambda_bn(self, arch: str, config: TrainConfig, train_images: int) -> float:
        """lambda_bn of a run with `config` on `train_images` images: the published value ("paper"), or
        ("integrated", [I]) that value times `fraction(arch)` * integrated_lr(paper) /
        integrated_lr(this run), so that lambda_bn * sum of lr over steps, the block norm's total
        shrinkage of a group norm, is that fraction of the paper's (about 12 for AlexNet) however short
        the run."""
        published = self.published_lambda_bn(arch)
        if self.lambda_bn_rule == "paper":
            return published
        return (published * self.fraction(arch) * integrated_lr(PAPER_SCHEDULE, PAPER_TRAIN_IMAGES)
                / integrated_lr(config, train_images))

    def train_config(self, *, seed: int, epochs: int | None = None, lr: float | None = None) -> TrainConfig:
        """`train` for one run: its seed and `epochs`/`lr` when given. Every variant keeps `train`'s weight
        decay on the parameters the block norm does not regularise (ungrouped convs, biases, the
        classifier); on its grouped conv weights the block norm replaces it [P] (`BlockNorm`)."""
        return dataclasses.replace(self.train, epochs=epochs or self.train.epochs, lr=lr or self.train.lr, seed=seed)

    def cgl_config(self, arch: str, model: nn.Module, variant: str, lam: float, seed: int,
                   lambda_bn: float) -> CGLConfig | None:
        """The regularisers of `variant` (None for the weight-decay baseline) on the grouped layers:
        those with >= `min_group_size` filters per group (`grouped_layers`)."""
        check_choice(variant, VARIANTS, "variant")
        if variant == "weight_decay":
            return None
        lam = lam if variant == "cgl" else 0.0
        convs = grouped_layers(model, conv_layers(model), groups=self.groups, min_group_size=self.min_group_size)
        active = grouped_layers(model, activation_layers(arch, model), groups=self.groups, min_group_size=self.min_group_size)
        if not convs or not active:
            raise ValueError(f"{arch}: no layer has {self.groups} groups of >= {self.min_group_size} filters; widen the "
                             f"network ([cgl] widths / synthetic_widths) or lower [cgl] min_group_size.")
        return CGLConfig(groups=self.groups, lambda_bn=lambda_bn, lambda_g=lam, lambda_s=lam,
                         activation_layers=active, block_norm_layers=convs, seed=seed)

    def grouped(self, arch: str, model: nn.Module) -> tuple[str, ...]:
        """The layers of `arch` that carry L_g and L_s (the layers whose groups G5-G7 measure)."""
        return grouped_layers(model, activation_layers(arch, model), groups=self.groups, min_group_size=self.min_group_size)


def integrated_lr(config: TrainConfig, train_images: int) -> float:
    """Sum of the learning rate over every optimiser step of `config` on `train_images` images (the
    loop's per-epoch schedules, ceil(images / batch) steps an epoch): the block norm's shrinkage budget
    per unit of lambda_bn (momentum scales it alike in the paper's run and ours)."""
    if train_images < 1:
        raise ValueError(f"integrated_lr needs at least one training image, got {train_images}.")
    epochs = np.arange(config.epochs)
    if config.schedule == "cosine":
        rates = config.lr * 0.5 * (1 + np.cos(np.pi * epochs / config.epochs))
    elif config.schedule == "step":
        rates = config.lr * config.gamma ** (epochs // config.step_size)
    else:
        rates = np.full(config.epochs, config.lr)
    return float(math.ceil(train_images / config.batch_size) * rates.sum())


def shrinkage_budget(settings: CGLSettings, arch: str, config: TrainConfig, train_images: int) -> dict[str, Any]:
    """The block norm's integrated shrinkage lambda_bn * sum(lr) of `arch` trained with `config` on
    `train_images` images, next to the paper's (its published lambda_bn on `PAPER_SCHEDULE`)."""
    paper_lr, our_lr = integrated_lr(PAPER_SCHEDULE, PAPER_TRAIN_IMAGES), integrated_lr(config, train_images)
    published, ours = settings.published_lambda_bn(arch), settings.lambda_bn(arch, config, train_images)
    return {"arch": arch, "rule": settings.lambda_bn_rule, "fraction": settings.fraction(arch),
            "paper_lambda_bn": published, "paper_sum_lr": paper_lr,
            "paper_shrinkage": published * paper_lr, "lambda_bn": ours, "sum_lr": our_lr, "shrinkage": ours * our_lr}


@dataclass(frozen=True)
class TaskData:
    """One task's images: `train` (capped), `val`, `broden` (the dissected split, capped), the class
    names and the images' `mean`/`std`."""

    train: Dataset
    val: Dataset
    broden: Dataset
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def synthetic_task(root: str | Path, settings: CGLSettings, *, split: str) -> TaskData:
    """Table 1's images: the `cgl_shapes` world at `root`, `synthetic_train_images` training images, the
    val split (its accuracy shows the networks learned the task) and `dissection_images` of the `split`
    dissected, decoded once into memory."""
    train = ClassificationDataset(root, "train")
    broden = seeded_subset(BrodenDataset(root, split=split), settings.dissection_images)
    return TaskData(InMemoryDataset(train, seeded_indices(len(train), settings.synthetic_train_images)),
                    InMemoryDataset(ClassificationDataset(root, "val")), InMemoryItems(broden), train.classes,
                    train.mean, train.std)


def main_task(sources: DataSources, settings: CGLSettings, *, split: str) -> TaskData:
    """Tables 2-3's images: `train_images` training images, the val split, and `dissection_images` of
    the Broden `split`. ConceptWorld is decoded once into memory (small, read by every model); real
    data (class folders resized to `image_size`, Broden) are streamed from disk, too large to hold."""
    train = ClassificationDataset(sources.classification, "train", image_size=settings.image_size)
    val = ClassificationDataset(sources.classification, "val", image_size=settings.image_size)
    broden = seeded_subset(BrodenDataset(sources.broden, split=split), settings.dissection_images)
    if sources.real:
        return TaskData(seeded_subset(train, settings.train_images), val, broden, train.classes, train.mean, train.std)
    return TaskData(InMemoryDataset(train, seeded_indices(len(train), settings.train_images)), InMemoryDataset(val),
                    InMemoryItems(broden), train.classes, train.mean, train.std)


def build_model(arch: str, num_classes: int, settings: CGLSettings) -> nn.Module:
    """The synthetic task's `TwoLayerCNN` or a torchvision backbone sized by `settings`."""
    if arch == "two_layer_cnn":
        return TwoLayerCNN(num_classes, widths=settings.synthetic_widths, global_pool=settings.synthetic_global_pool)
    return build_backbone(arch, num_classes, small_input=settings.small_input(arch), width=settings.width(arch))


@dataclass(frozen=True)
class VariantRecipe(Recipe):
    """One CGL run for `train_cached`: `arch` sized by `settings`, with the regularisers of `variant`
    (lambda_g = lambda_s = `lam` for full CGL, the block norm's weight `lambda_bn`; `seed` seeds the
    pair sampling)."""

    arch: str
    variant: str
    num_classes: int
    settings: CGLSettings
    lam: float
    seed: int
    lambda_bn: float

    def build(self) -> nn.Module:
        return build_model(self.arch, self.num_classes, self.settings)

    def cgl_config(self, model: nn.Module) -> CGLConfig | None:
        return self.settings.cgl_config(self.arch, model, self.variant, self.lam, self.seed, self.lambda_bn)

    def loss_terms(self, model: nn.Module) -> list:
        config = self.cgl_config(model)
        return cgl_loss_terms(model, config) if config is not None else []

    def key(self, model: nn.Module) -> dict[str, Any]:
        settings = self.settings
        return {"model": {"arch": self.arch, "num_classes": self.num_classes, "width": settings.width(self.arch),
                          "small_input": settings.small_input(self.arch), "synthetic_widths": settings.synthetic_widths,
                          "global_pool": settings.synthetic_global_pool},
                "loss": {"variant": self.variant, "cgl": self.cgl_config(model)}}


@dataclass
class TrainedModel:
    """A trained (or cached) CGL model with its run's identity, training history and regularisers."""

    arch: str
    variant: str
    seed: int
    model: nn.Module
    history: pd.DataFrame
    config: CGLConfig | None


def train_variant(arch: str, variant: str, train_set: Dataset, *, num_classes: int, settings: CGLSettings, seed: int,
                  lam: float, device: str | torch.device | None = None, val_set: Dataset | None = None,
                  epochs: int | None = None, lr: float | None = None) -> TrainedModel:
    """Train (or load from the cache) `arch` with the regularisers of `variant`, seeded; with `val_set`
    the history holds its accuracy after every epoch (the learning curve)."""
    config = settings.train_config(seed=seed, epochs=epochs, lr=lr)
    recipe = VariantRecipe(arch, variant, num_classes, settings, lam, seed, settings.lambda_bn(arch, config, len(train_set)))
    result = train_cached("cgl", recipe, train_set, config=config, val_set=val_set, device=device)
    return TrainedModel(arch, variant, seed, result.model, result.history, recipe.cgl_config(result.model))


def select_lambda(tuning_accuracy: dict[float, float], reference_accuracy: float, tolerance: float) -> float:
    """The sweep's rule [I]: the largest lambda whose held-out accuracy is within `tolerance` points of
    the block-norm-only model's; the smallest lambda when none is. Accuracies are fractions."""
    if not tuning_accuracy:
        raise ValueError("select_lambda needs at least one (lambda, accuracy) pair.")
    admissible = [lam for lam, acc in tuning_accuracy.items() if 100 * (reference_accuracy - acc) <= tolerance]
    return max(admissible) if admissible else min(tuning_accuracy)


def _unique_by_category(summary: pd.DataFrame) -> dict[str, int]:
    return dict(zip(summary["category"], summary["unique_detectors"].astype(int)))


def training_record(trained: TrainedModel) -> dict[str, Any]:
    """One trained model's row: identity, epochs, last train and val accuracy (%), whether the val curve
    has plateaued (`training.classifiers.plateaued`), training minutes and its lambda_bn."""
    history = trained.history
    return {"arch": trained.arch, "variant": trained.variant, "seed": trained.seed, "epochs": len(history),
            "train_acc": 100 * history.train_acc.iloc[-1], "val_acc": 100 * history.val_acc.iloc[-1],
            "plateaued": plateaued(history), "minutes": history.seconds.sum() / 60,
            "lambda_bn": trained.config.lambda_bn if trained.config is not None else 0.0}


def _history(trained: TrainedModel) -> pd.DataFrame:
    return trained.history.assign(arch=trained.arch, variant=trained.variant, seed=trained.seed)


def run_synthetic(train_set: Dataset, val_set: Dataset, broden: Dataset, *, settings: CGLSettings, seeds: Sequence[int],
                  lam: float, num_classes: int, dissection: DissectionConfig, device: str | torch.device | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[tuple[str, int], nn.Module]]:
    """Table 1: the two-layer CNN per variant and seed (its val accuracy after every epoch recorded), conv1/conv2
    dissected (`dissection` settings) on color, object (shape) and part (colour-shape). Returns (one row per
    seed x variant x layer, one `training_record` per model, the learning curves, {(variant, seed): model})."""
    rows, runs, histories, models = [], [], [], {}
    for seed in seeds:
        for variant in VARIANTS:
            trained = train_variant("two_layer_cnn", variant, train_set, num_classes=num_classes, settings=settings,
                                    seed=seed, lam=lam, device=device, val_set=val_set, epochs=settings.synthetic_epochs,
                                    lr=settings.synthetic_lr)
            models[(variant, seed)] = trained.model
            runs.append(training_record(trained))
            histories.append(_history(trained))
            table, _ = dissection_tables(dissect_layers(trained.model, ["conv1", "conv2"], broden, config=dissection,
                                                        categories=list(SYNTHETIC_CATEGORIES), device=device))
            for layer, summary in table.groupby("layer", sort=False):
                counts = _unique_by_category(summary)
                rows.append({"variant": variant, "seed": seed, "layer": layer,
                             **{name: counts.get(cat, 0) for cat, name in SYNTHETIC_CATEGORIES.items()},
                             "total": counts["total"]})
    return pd.DataFrame(rows), pd.DataFrame(runs), pd.concat(histories, ignore_index=True), models


def run_sweep(train_set: Dataset, *, settings: CGLSettings, num_classes: int, seed: int, batch_size: int,
              device: str | torch.device | None = None) -> tuple[pd.DataFrame, float]:
    """The lambda_g = lambda_s sweep on `settings.sweep_arch`: train on the training split minus a held-out
    tuning part, compare held-out accuracy with the block-norm-only model, pick by `select_lambda`.
    The grid is trained upwards and stops at the first lambda out of tolerance (stronger regularisers
    only cost more accuracy [I]). A single-value grid is taken as given (no training). Returns (table, chosen lambda): per lambda the
    tuning accuracy (%), its drop against the block-norm model with the standard error of that paired
    per-image difference (points; it must stay below the tolerance for the rule to mean anything), and
    whether it was chosen; `tuning_images` is the n behind them."""
    grid = tuple(settings.lambda_grid)
    if len(grid) == 1:
        return pd.DataFrame({"lambda": list(grid), "tuning_acc": [np.nan], "drop": [np.nan], "drop_se": [np.nan],
                             "chosen": [True], "tuning_images": [0]}), grid[0]
    fit, tune = split_indices(len(train_set), settings.tuning_fraction, seed=seed)
    fit_set, tune_set = torch.utils.data.Subset(train_set, fit), torch.utils.data.Subset(train_set, tune)
    fit_set.fingerprint = {"source": train_set.fingerprint, "indices": cache.config_hash(fit)}
    correct = {}
    for lam in (0.0, *sorted(grid)):
        variant = "cgl" if lam else "block_norm"
        trained = train_variant(settings.sweep_arch, variant, fit_set, num_classes=num_classes, settings=settings,
                                seed=seed, lam=lam, device=device)
        labels, logits = predict(trained.model, tune_set, batch_size=batch_size, device=device)
        correct[lam] = (logits.argmax(1) == labels).double().numpy()
        if lam and 100 * (correct[0.0].mean() - correct[lam].mean()) > settings.accuracy_tolerance:
            break  # the first lambda out of tolerance bounds the choice from above: larger ones are not trained
    reference = correct.pop(0.0)
    grid = tuple(correct)
    accuracy = {lam: float(c.mean()) for lam, c in correct.items()}
    chosen = select_lambda(accuracy, float(reference.mean()), settings.accuracy_tolerance)
    table = pd.DataFrame({"lambda": [0.0, *grid], "tuning_acc": [100 * reference.mean(), *(100 * a for a in accuracy.values())],
                          "drop": [0.0, *(100 * (reference.mean() - c.mean()) for c in correct.values())],
                          "drop_se": [0.0, *(100 * float(stats.sem(reference - c)) for c in correct.values())]})
    return table.assign(chosen=table["lambda"] == chosen, tuning_images=len(tune)), chosen


def run_main(train_set: Dataset, val_set: Dataset, broden: Dataset, *, settings: CGLSettings, seeds: Sequence[int],
             lam: float, num_classes: int, dissection: DissectionConfig, batch_size: int,
             device: str | torch.device | None = None
             ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[tuple[str, str, int], nn.Module]]:
    """Tables 2-3: every arch x variant (`settings.main_variants`) x seed trained (val accuracy recorded
    after every epoch), evaluated (top-1 on val, `batch_size` images a batch) and dissected (all six categories, `dissection` settings)
    at the paper's layers. Returns (detectors: one row per model and layer with unique detectors and
    filters, models: one `training_record` per model with top-1 and RUD, purity: `group_purity` of every
    dissected grouped layer's groups per model (G8), the learning curves, {(arch, variant, seed): model})."""
    layer_rows, model_rows, purity, histories, models = [], [], [], [], {}
    for arch in settings.archs:
        for seed in seeds:
            for variant in settings.main_variants:
                trained = train_variant(arch, variant, train_set, num_classes=num_classes, settings=settings, seed=seed,
                                        lam=lam, device=device, val_set=val_set)
                models[(arch, variant, seed)] = trained.model
                histories.append(_history(trained))
                layers = dissected_layers(arch, trained.model)
                table, units = dissection_tables(dissect_layers(trained.model, layers, broden, config=dissection,
                                                                device=device))
                grouped = grouped_layers(trained.model, layers, groups=settings.groups, min_group_size=settings.min_group_size)
                purity.extend(group_purity(units, trained.model, layer, groups=settings.groups).assign(
                    arch=arch, variant=variant, seed=seed) for layer in grouped)
                totals = table[table.category == "total"].set_index("layer").loc[list(layers)]
                for position, (layer, row) in enumerate(totals.iterrows(), start=1):
                    layer_rows.append({"arch": arch, "variant": variant, "seed": seed, "layer": f"c{position}",
                                       "module": layer, "unique": int(row.unique_detectors), "filters": int(row.units)})
                accuracy = evaluate(trained.model, val_set, batch_size=batch_size, device=device)["accuracy"]
                rud = ratio_of_unique_detectors(totals.unique_detectors.iloc[-2:].tolist(), totals.units.iloc[-2:].tolist())
                model_rows.append({**training_record(trained), "top1": 100 * accuracy,
                                   "unique_sum": int(totals.unique_detectors.sum()), "rud": rud})
    return (pd.DataFrame(layer_rows), pd.DataFrame(model_rows), pd.concat(purity, ignore_index=True),
            pd.concat(histories, ignore_index=True), models)


def run_group_statistics(models: Mapping[tuple[str, str, int], nn.Module], dataset: Dataset, *,
                         settings: CGLSettings, quantile: float, batch_size: int,
                         device: str | torch.device | None = None) -> pd.DataFrame:
    """G5-G7 per model of `run_main` ({(arch, variant, seed): model}), averaged over its grouped layers
    with L_g (`CGLSettings.grouped`): `group_statistics` on the first `settings.analysis_images` images of
    `dataset` (the trained losses, the collapse diagnostics and the untrained mask measures, masks at the
    dissection's `quantile`, top areas over `settings.top_images` images; `mask_iou_gap` = within -
    across) and the top group's share of beta (`relevance_summary`)."""
    rows = []
    for (arch, variant, seed), model in models.items():
        layers = settings.grouped(arch, model)
        stats = group_statistics(model, layers, dataset, groups=settings.groups, images=settings.analysis_images,
                                 batch_size=batch_size, device=device, quantile=quantile, top_images=settings.top_images)
        relevance = relevance_summary(relevance_table(model, [producing_conv(model, layer) for layer in layers],
                                                      groups=settings.groups))
        rows.append({"arch": arch, "variant": variant, "seed": seed,
                     **stats.drop(columns="layer").mean().to_dict(), "top_group_share": relevance.top_share.mean()})
    table = pd.DataFrame(rows)
    return table.assign(mask_iou_gap=table.mask_iou_within - table.mask_iou_across)


def relevance_distributions(models: Mapping[tuple[str, str, int], nn.Module], settings: CGLSettings) -> pd.DataFrame:
    """beta_gl of every grouped conv of every model (`relevance_table`, one row per model, layer and group)
    with its ratio to the layer's largest: the paper's Fig. 4 circle sizes, per variant."""
    tables = []
    for (arch, variant, seed), model in models.items():
        convs = [producing_conv(model, layer) for layer in settings.grouped(arch, model)]
        table = relevance_table(model, convs, groups=settings.groups)
        table["of_max"] = table.beta / table.groupby("layer").beta.transform("max")
        tables.append(table.assign(arch=arch, variant=variant, seed=seed))
    return pd.concat(tables, ignore_index=True)

"""Studies built from several dissections: concepts across depth (of `features.dissect_layers`), and the
rotation (axis-alignment) test."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from replication.analysis.dissection import Dissection, DissectionConfig, dissect
from replication.analysis.features import feature_shapes
from replication.analysis.rotation import fractional_rotation, random_rotation


def layer_summary(dissections: dict[str, Dissection], value: str = "unique_detectors") -> pd.DataFrame:
    """One row per layer (in the given order), one column per category plus `total`: `value` counts."""
    rows = {layer: result.summary.set_index("category")[value] for layer, result in dissections.items()}
    return pd.DataFrame(rows).T.rename_axis("layer")


def depth_summary(dissections: Mapping[tuple[str, int], Mapping[str, Dissection]], value: str = "unique_detectors") -> pd.DataFrame:
    """`layer_summary` of every run (`dissections[arch, seed][layer]`), averaged over seeds: one row per
    (arch, layer) in the given order."""
    runs = pd.concat({key: layer_summary(dict(results), value) for key, results in dissections.items()}, names=["arch", "seed"])
    return runs.groupby(["arch", "layer"], sort=False).mean()


def concept_detection(dissections: Mapping[tuple[str, int], Mapping[str, Dissection]], concepts: pd.DataFrame) -> pd.DataFrame:
    """Whether each concept of `concepts` (rows with `category` and `concept`) is found by the networks:
    `dissections[arch, seed][layer]`, every layer dissected on the same labels.

    One row per concept (the columns of `concepts` first), then per arch: `<arch> seeds` (in how many
    seeds some unit of some layer is a detector labelled with it), `<arch> layers` (the layers where
    that happens in at least one seed, shallow to deep) and `<arch> best_iou` (the best IoU any unit of
    any layer reaches with it, mean over seeds: how close the runs that miss it come).
    """
    archs = list(dict.fromkeys(arch for arch, _ in dissections))
    concepts = concepts.reset_index(drop=True)
    columns = {name: concepts[name] for name in concepts.columns}
    for arch in archs:
        runs = [layers for (name, _), layers in dissections.items() if name == arch]
        seeds, layers, best = [], [], []
        for concept in concepts.itertuples(index=False):
            found = [[layer for layer, result in run.items() if _detects(result, concept.category, concept.concept)]
                     for run in runs]
            seeds.append(sum(bool(hit) for hit in found))
            layers.append(", ".join(layer for layer in runs[0] if any(layer in hit for hit in found)))
            best.append(float(np.mean([np.fmax.reduce([_best_iou(result, concept.concept) for result in run.values()])
                                        for run in runs])))
        columns.update({f"{arch} seeds": seeds, f"{arch} layers": layers, f"{arch} best_iou": best})
    return pd.DataFrame(columns)


def _detects(result: Dissection, category: str, label: str) -> bool:
    units = result.units
    return bool((units["detector"] & (units["category"] == category) & (units["label"] == label)).any())


def _best_iou(result: Dissection, label: str) -> float:
    """The best IoU of any unit with `label` (NaN when its category was not scored)."""
    return float(np.fmax.reduce(result.iou[:, result.label_names.index(label)]))


def plot_layer_summary(summary: pd.DataFrame, *, title: str = "", ax=None):
    """Stacked bars of unique detectors per category, one bar per layer (shallow to deep)."""
    categories = [c for c in summary.columns if c != "total"]
    if ax is None:
        fig, ax = plt.subplots()
    else:
        fig = ax.figure
    summary[categories].plot.bar(stacked=True, ax=ax, width=0.75, colormap="tab10")
    ax.set_ylabel("unique detectors")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncols=3)
    crowded = len(summary) > 5 or max(len(str(layer)) for layer in summary.index) > 8
    ax.tick_params(axis="x", rotation=40 if crowded else 0)
    if crowded:
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    return fig


def rotation_study(
    model: nn.Module, layer: str, dataset, *, alphas: Sequence[float], seed: int, config: DissectionConfig,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Unique detectors of `layer` in the basis Q^α for each α (Network Dissection's rotation test),
    each dissected with `config`'s quantile, IoU threshold and batch size.

    Q is a seeded Haar-random rotation of the layer's channel space; thresholds are recomputed in
    every basis. α = 0 is the natural (unit) basis, α = 1 the fully rotated one. Columns: `alpha`,
    `detectors`, `unique_detectors`, `unique_<category>` per category, `mean_best_iou` (each unit's or
    direction's best IoU, averaged: how well the basis aligns with concepts short of the threshold),
    `rotation_seed`.
    """
    channels = feature_shapes(model, [layer], dataset, device=device)[layer][0]
    rotation = random_rotation(channels, seed)
    rows = []
    for alpha in alphas:
        basis = fractional_rotation(rotation, alpha).float()
        result = dissect(model, layer, dataset, basis=basis, device=device, **config.dissect_keywords())
        summary = result.summary.set_index("category")
        by_category = {f"unique_{category}": int(count) for category, count in summary["unique_detectors"].items()
                       if category != "total"}
        rows.append({"alpha": float(alpha), "detectors": int(summary.loc["total", "detectors"]),
                     "unique_detectors": int(summary.loc["total", "unique_detectors"]), **by_category,
                     "mean_best_iou": float(result.units["iou"].mean()),
                     "rotation_seed": seed})
    return pd.DataFrame(rows)


def plot_rotation_study(study: pd.DataFrame, *, title: str = "", ax=None):
    """Unique detectors against the rotation power α, mean ± SD over the rows of each α (one
    `rotation_study` per model seed, stacked): the total, and each category that has any."""
    if ax is None:
        fig, ax = plt.subplots()
    else:
        fig = ax.figure
    columns = ["unique_detectors"] + [c for c in study.columns if c.startswith("unique_") and c != "unique_detectors"
                                      and study[c].any()]
    for column in columns:
        stats = study.groupby("alpha")[column].agg(["mean", "std"]).fillna(0.0)
        label = "total" if column == "unique_detectors" else column.removeprefix("unique_")
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"], marker="o", capsize=3, label=label,
                    lw=2.5 if label == "total" else 1.2)
    ax.set_xlabel("rotation power α (0 = unit basis, 1 = random rotation)")
    ax.set_ylabel("unique detectors (mean ± SD over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig

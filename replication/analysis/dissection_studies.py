"""Studies built from several dissections: concepts across depth (of `features.dissect_layers`), and the
rotation (axis-alignment) test."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
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


def plot_layer_summary(summary: pd.DataFrame, *, title: str = "", ax=None):
    """Stacked bars of unique detectors per category, one bar per layer (shallow to deep)."""
    categories = [c for c in summary.columns if c != "total"]
    if ax is None:
        fig, ax = plt.subplots()
    else:
        fig = ax.figure
    summary[categories].plot.bar(stacked=True, ax=ax, width=0.75, colormap="tab10")
    ax.set_ylabel("unique detectors")
    ax.set_title(title)
    ax.legend(fontsize=7, ncols=3)
    ax.tick_params(axis="x", rotation=0)
    return fig


def rotation_study(
    model: nn.Module, layer: str, dataset, *, alphas: Sequence[float], seed: int, config: DissectionConfig,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Unique detectors of `layer` in the basis Q^α for each α (Network Dissection's rotation test),
    each dissected with `config`'s quantile, IoU threshold and batch size.

    Q is a seeded Haar-random rotation of the layer's channel space; thresholds are recomputed in
    every basis. α = 0 is the natural (unit) basis, α = 1 the fully rotated one.
    """
    channels = feature_shapes(model, [layer], dataset, device=device)[layer][0]
    rotation = random_rotation(channels, seed)
    rows = []
    for alpha in alphas:
        basis = fractional_rotation(rotation, alpha).float()
        result = dissect(model, layer, dataset, basis=basis, device=device, **config.dissect_keywords())
        summary = result.summary.set_index("category")
        rows.append(
            {
                "alpha": float(alpha),
                "detectors": int(summary.loc["total", "detectors"]),
                "unique_detectors": int(summary.loc["total", "unique_detectors"]),
                "rotation_seed": seed,
            }
        )
    return pd.DataFrame(rows)


def plot_rotation_study(study: pd.DataFrame, *, group: str | None = None, ax=None):
    """Unique detectors against the rotation power α (one line per `group` value if given)."""
    if ax is None:
        fig, ax = plt.subplots()
    else:
        fig = ax.figure
    groups = study.groupby(group) if group else [("", study)]
    for name, frame in groups:
        mean = frame.groupby("alpha")["unique_detectors"].agg(["mean", "std"]).fillna(0.0)
        ax.errorbar(mean.index, mean["mean"], yerr=mean["std"], marker="o", capsize=3, label=str(name) or None)
    ax.set_xlabel("rotation power α (0 = unit basis, 1 = random rotation)")
    ax.set_ylabel("unique detectors")
    if group:
        ax.legend()
    return fig

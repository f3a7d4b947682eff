"""Figures and tables of a `Dissection`: detectors per category, top images per unit, unit labels.

Figures are returned open; callers save them with `replication.io.save_figure` and close them.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from replication.analysis.dissection import Dissection, activation_masks, project_basis
from replication.models.hooks import capture_activations
from replication.runtime import resolve_device


def unit_label_table(dissection: Dissection, *, detectors_only: bool = True) -> pd.DataFrame:
    """Unit, category, label and IoU, best IoU first (detectors only by default), IoU rounded to 3 places."""
    table = dissection.units[["unit", "category", "label", "iou", "detector"]]
    if detectors_only:
        table = table[table.detector]
    table = table.sort_values(["iou", "unit"], ascending=[False, True]).drop(columns="detector")
    return table.assign(iou=table.iou.round(3)).reset_index(drop=True)


def plot_detectors_per_category(dissection: Dissection, *, title: str | None = None, ax=None):
    """Bar chart: detectors and unique detectors per category (NetDissect's summary figure)."""
    summary = dissection.summary[dissection.summary.category != "total"]
    figure, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    positions = np.arange(len(summary))
    ax.bar(positions - 0.2, summary.detectors, width=0.4, label="detectors")
    ax.bar(positions + 0.2, summary.unique_detectors, width=0.4, label="unique detectors")
    ax.set_xticks(positions, summary.category)
    ax.set_ylabel("count")
    threshold = dissection.config.get("iou_threshold")
    ax.set_title(title or f"{dissection.config.get('layer', '')}: IoU {dissection.config.get('detector_comparison', '>=')} {threshold}")
    ax.legend(frameon=False)
    return figure


def plot_top_images(
    dissection: Dissection,
    dataset,
    units: Sequence[int],
    *,
    model: nn.Module | None = None,
    layer: str | None = None,
    features: torch.Tensor | None = None,
    basis: torch.Tensor | None = None,
    top_k: int = 5,
    device: str | torch.device | None = None,
):
    """The `top_k` images with the largest activation of each unit, outside its thresholded mask dimmed.

    Activations come from `model` at `layer` (default: the dissected layer) or from the precomputed
    `features` (N × K × h × w, dataset order); `basis` must be the one given to the dissection.
    """
    if (model is None) == (features is None):
        raise ValueError("pass exactly one of model= (with layer=) or features= to recompute the unit maps.")
    device = resolve_device(device)
    layer = layer or dissection.config["layer"]
    units = list(units)
    figure, axes = plt.subplots(len(units), top_k, figsize=(1.6 * top_k, 1.8 * len(units)), squeeze=False)
    mean = torch.tensor(getattr(dataset, "mean", (0.0, 0.0, 0.0))).view(3, 1, 1)
    std = torch.tensor(getattr(dataset, "std", (1.0, 1.0, 1.0))).view(3, 1, 1)
    for row, unit in enumerate(units):
        best = np.argsort(-dissection.image_max[:, unit], kind="stable")[:top_k].tolist()
        images = torch.stack([dataset[i]["image"] for i in best])
        if model is not None:
            model.to(device).eval()
            with torch.no_grad(), capture_activations(model, layer) as captured:
                model(images.to(device))
            maps = captured[layer]
        else:
            maps = features[best].to(device)
        masks = activation_masks(project_basis(maps, basis), dissection)[:, unit].float().cpu()
        record = dissection.units.iloc[unit]
        for col, (index, image, mask) in enumerate(zip(best, images, masks)):
            shown = (image * std + mean).clamp(0, 1)
            mask = torch.nn.functional.interpolate(mask[None, None], size=shown.shape[1:], mode="nearest")[0]
            ax = axes[row, col]
            ax.imshow((shown * (0.25 + 0.75 * mask)).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"#{index}", fontsize=7)
        axes[row, 0].set_ylabel(f"unit {unit}\n{record.label} {record.iou:.2f}", fontsize=8)
    figure.tight_layout()
    return figure

"""The paper's figures: the soft receptive fields of one group's filters on the same images (Fig. 2), the
top-activating images of units with their above-T_k regions (Fig. 5) and the distribution of the groups'
relevance factors beta (Fig. 4)."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from torch.utils.data import Dataset

from replication import runtime
from replication.methods.concept_groups.groups import GROUPS, group_weight_norms, partition_filters
from replication.methods.concept_groups.metrics import above_threshold
from replication.methods.concept_groups.receptive_field import SoftReceptiveField
from replication.models.anatomy import producing_conv
from replication.models.hooks import capture_activations


@torch.no_grad()
def plot_group_maps(models: dict[str, nn.Module], layer: str, images: torch.Tensor, *, groups: int = GROUPS,
                    filters: int = 4, mean: Sequence[float], std: Sequence[float],
                    device: str | torch.device | None = None) -> Figure:
    """The paper's qualitative check: psi maps of `filters` filters of one group on the same images.

    For each model the group with the largest relevance beta_gl in `layer` is shown; filters of a
    coherent group light up the same regions. Rows: model x image; columns: the image, then filters.
    """
    device = runtime.resolve_device(device)
    field = SoftReceptiveField().to(device)
    rows = len(models) * len(images)
    fig, axes = plt.subplots(rows, filters + 1, figsize=(1.6 * (filters + 1), 1.6 * rows), squeeze=False)
    shown = (images * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    for m, (name, model) in enumerate(models.items()):
        model = model.to(device).eval()
        with capture_activations(model, [layer]) as acts:
            model(images.to(device))
        psi = field.of_layer(model, layer, acts[layer]).cpu()
        partition = partition_filters(psi.shape[1], groups)
        beta = group_weight_norms(model.get_submodule(producing_conv(model, layer)).weight.detach().cpu(), partition)
        group = int(beta.argmax())
        maps = partition.split(psi, dim=1)[:, group, :filters]
        for i in range(len(images)):
            row = axes[m * len(images) + i]
            row[0].imshow(shown[i].permute(1, 2, 0).numpy())
            row[0].set_ylabel(f"{name}\ngroup {group}" if i == 0 else "", fontsize=7)
            for f in range(min(filters, maps.shape[1])):
                row[f + 1].imshow(maps[i, f].numpy(), cmap="magma", vmin=0, vmax=1)
                if m == 0 and i == 0:
                    row[f + 1].set_title(f"filter {group * partition.group_size + f}", fontsize=7)
    return _image_grid_done(fig, axes, f"{layer}: soft receptive fields of one group (most relevant by beta)")


@torch.no_grad()
def plot_top_activations(models: dict[str, nn.Module], layer: str, dataset: Dataset, *, images: int,
                         groups: int = GROUPS, units: int = 2, top_k: int = 5, quantile: float = 0.005,
                         mean: Sequence[float], std: Sequence[float], batch_size: int,
                         device: str | torch.device | None = None) -> Figure:
    """The paper's Fig. 5: for each model, `units` units of `layer`'s conv (the first filter of each of
    its `units` most relevant groups by beta [I]) and the `top_k` of the first `images` images of
    `dataset` with the largest maximum activation, dimmed outside the region above T_k (the unit's
    top-`quantile` level over those images, Network Dissection's threshold; the feature-map mask is
    enlarged to the image by nearest neighbours). The label gives the region's share of the map: a
    compact region is the paper's claim for L_s (G7). Rows: model x unit; columns: images.
    """
    device = runtime.resolve_device(device)
    subset = torch.utils.data.Subset(dataset, range(min(images, len(dataset))))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size)
    pixels = torch.cat([batch[0] for batch in loader])
    shown = (pixels * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
    fig, axes = plt.subplots(len(models) * units, top_k, figsize=(1.5 * top_k, 1.6 * len(models) * units),
                             squeeze=False)
    for m, (name, model) in enumerate(models.items()):
        model = model.to(device).eval()
        conv = producing_conv(model, layer)
        maps = []
        with capture_activations(model, [conv]) as acts:
            for start in range(0, len(pixels), batch_size):
                model(pixels[start:start + batch_size].to(device))
                maps.append(acts[conv].cpu())
        maps = torch.cat(maps)
        masks = above_threshold(maps, quantile=quantile)
        weight = model.get_submodule(conv).weight.detach().cpu()
        partition = partition_filters(weight.shape[0], groups)
        chosen = group_weight_norms(weight, partition).argsort(descending=True)[:units]
        for u, group in enumerate(chosen.tolist()):
            unit = group * partition.group_size
            best = maps[:, unit].flatten(1).amax(1).topk(top_k).indices
            row = axes[m * units + u]
            for ax, index in zip(row, best.tolist()):
                mask = masks[index, unit].float()
                region = torch.nn.functional.interpolate(mask[None, None], size=shown.shape[2:], mode="nearest")[0]
                ax.imshow((shown[index] * (0.25 + 0.75 * region)).permute(1, 2, 0).numpy())
                ax.set_xlabel(f"area {float(mask.mean()):.2f}", fontsize=7)
            row[0].set_ylabel(f"{name}\nunit {unit} (group {group})", fontsize=7)
    return _image_grid_done(fig, axes, f"{layer}: top-{top_k} images per unit, outside the above-T_k region dimmed")


def _image_grid_done(fig: Figure, axes: np.ndarray, title: str) -> Figure:
    """A grid of images without ticks, titled and laid out."""
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_relevance(relevance: pd.DataFrame, *, labels: dict[str, str] | None = None) -> Figure:
    """The paper's Fig. 4 as distributions: every group's relevance beta_gl (one dot per group and seed),
    per variant, one panel per grouped layer (`relevance_distributions` of one arch). A block norm that
    acts shrinks beta and spreads it over the groups; weight decay keeps it near uniform."""
    layers = list(dict.fromkeys(relevance["layer"]))
    variants = list(dict.fromkeys(relevance["variant"]))
    fig, axes = plt.subplots(1, len(layers), figsize=(2.4 * len(layers), 2.8), squeeze=False)
    jitter = np.random.default_rng(0)
    for ax, layer in zip(axes[0], layers):
        for x, variant in enumerate(variants):
            beta = relevance[(relevance.layer == layer) & (relevance.variant == variant)].beta.to_numpy()
            ax.scatter(x + jitter.uniform(-0.15, 0.15, len(beta)), beta, s=10, alpha=0.7)
        ax.set_xticks(range(len(variants)), [(labels or {}).get(v, v) for v in variants], rotation=30, fontsize=7)
        ax.set_title(layer, fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("group relevance beta_gl = ||w_gl||_F")
    fig.tight_layout()
    return fig

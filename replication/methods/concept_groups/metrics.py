"""The paper's measures of a CGL model: group coherence (G5), relevance (G6), spatial spread (G7),
unique-detector ratio (Table 3) and group purity (G8); the untrained mask measures and collapse
diagnostics that test G5 and G7 without the losses CGL trains."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from replication import runtime
from replication.analysis.dissection import Dissection
from replication.analysis.thresholds import TopValues, compare_to_thresholds, comparison_thresholds, quantile_level
from replication.methods.concept_groups.groups import GROUPS, GroupPartition, group_weight_norms, partition_filters
from replication.methods.concept_groups.losses import BlockNorm
from replication.methods.concept_groups.receptive_field import SoftReceptiveField, distance_from_l1, spatial_spread
from replication.models.anatomy import producing_conv
from replication.models.hooks import capture_activations


def within_group_distance(psi: torch.Tensor, partition: GroupPartition) -> torch.Tensor:
    """Mean per-sample D over all within-group pairs i < j, per group (length G) [I, claim G5].

    `psi`: (N, C, H, W) soft maps of one layer. Uses pairwise L1 distances (cdist) so all pairs are
    computed at once.
    """
    maps = partition.split(psi.float(), dim=1).flatten(3)  # (N, G, f, P)
    n, g, f, p = maps.shape
    flat = maps.reshape(n * g, f, p)
    diff = torch.cdist(flat, flat, p=1)  # (N*G, f, f)
    mass = flat.sum(-1)
    distance = distance_from_l1(diff, mass[:, :, None], mass[:, None, :])
    upper = torch.triu_indices(f, f, offset=1, device=psi.device)
    return distance[:, upper[0], upper[1]].reshape(n, g, -1).mean(dim=(0, 2))


def relevance_table(model: nn.Module, layers: Iterable[str], *, groups: int = GROUPS, free_filters: int | None = None) -> pd.DataFrame:
    """beta_gl = ||w_gl||_F per layer and group, with each group's share of beta_l [P, claim G6]."""
    layers, rows = tuple(layers), []
    with torch.no_grad():
        betas = BlockNorm(layers, weight=1.0, groups=groups, free_filters=free_filters).relevance(model)
    for layer, beta in zip(layers, betas):
        beta = beta.double().cpu()
        for group, value in enumerate(beta.tolist()):
            rows.append({"layer": layer, "group": group, "beta": value, "share": value / float(beta.sum())})
    return pd.DataFrame(rows)


def relevance_summary(table: pd.DataFrame, *, small_fraction: float = 0.01) -> pd.DataFrame:
    """Per layer: the top group's share of beta_l and the number of groups below `small_fraction` of
    the largest beta (the spec's measures of a sparse group weighting, claim G6 [I])."""
    grouped = table.groupby("layer", sort=False)
    return pd.DataFrame(
        {
            "top_share": grouped["share"].max(),
            "small_groups": grouped["beta"].apply(lambda b: int((b < small_fraction * b.max()).sum())),
        }
    ).reset_index()


def ratio_of_unique_detectors(unique_detectors: Sequence[int], filters: Sequence[int]) -> float:
    """RUD: unique detectors of the last two conv layers over their number of filters [P]."""
    if len(unique_detectors) != 2 or len(filters) != 2:
        raise ValueError("RUD takes the unique-detector counts and filter counts of exactly the last two conv layers.")
    return float(sum(unique_detectors)) / float(sum(filters))


def dissection_tables(dissections: Mapping[str, Dissection]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long tables of several layers' dissections (`analysis.features.dissect_layers`).

    Returns (summary: unique detectors and detectors per layer and category, one row per pair, with the
    layer's unit count; units: one row per layer and unit with its best label, category, IoU and detector flag).
    """
    summaries = [result.summary.assign(layer=layer, units=len(result.units)) for layer, result in dissections.items()]
    units = [result.units[["unit", "label", "category", "iou", "detector"]].assign(layer=layer)
             for layer, result in dissections.items()]
    return pd.concat(summaries, ignore_index=True), pd.concat(units, ignore_index=True)


def group_purity(units: pd.DataFrame, model: nn.Module, layer: str, *, groups: int = GROUPS,
                 free_filters: int | None = None, min_detectors: int = 2) -> pd.DataFrame:
    """Claim G8 per group of one dissected layer: its relevance beta_gl and how far its detectors share one concept.

    `units`: the layer's unit table (`dissection_tables`). A detector is a unit whose best IoU reaches
    the dissection threshold: the paper's alignment threshold T is unknown [U], so the dissection
    threshold stands in for it [I]. purity = the largest number of the group's detectors with one
    label / its detectors; NaN below `min_detectors` detectors (one detector is trivially pure) [I].
    """
    weight = model.get_submodule(producing_conv(model, layer)).weight.detach().cpu()
    partition = partition_filters(weight.shape[0], groups, free_filters, min_size=0)
    beta = group_weight_norms(weight, partition).double()
    group_of = partition.group_of().numpy()
    rows = []
    for group in range(partition.groups):
        members = units[(units.layer == layer) & np.isin(units.unit, np.flatnonzero(group_of == group))]
        labels = members.loc[members.detector.astype(bool), "label"]
        purity = labels.value_counts().iloc[0] / len(labels) if len(labels) >= min_detectors else np.nan
        rows.append({"layer": layer, "group": group, "beta": float(beta[group]), "detectors": len(labels),
                     "purity": float(purity)})
    return pd.DataFrame(rows)


def _pair_means(matrix: torch.Tensor, partition: GroupPartition) -> tuple[float, float]:
    """Mean of a symmetric unit x unit `matrix` over pairs i < j of grouped units in the same group and in
    different groups (free units left out)."""
    group_of = partition.group_of()
    i, j = torch.triu_indices(len(group_of), len(group_of), offset=1)
    grouped = (group_of[i] >= 0) & (group_of[j] >= 0)
    same = grouped & (group_of[i] == group_of[j])
    values = matrix[i, j].double()
    return float(values[same].mean()), float(values[grouped & ~same].mean())


def above_threshold(activations: torch.Tensor, *, quantile: float) -> torch.Tensor:
    """(N, C, H, W) booleans: where each unit's map exceeds T_k, its top-`quantile` level over all N images
    and positions (Network Dissection's threshold, at feature-map resolution)."""
    n, c = activations.shape[:2]
    flat = activations.transpose(0, 1).reshape(c, -1).float()
    top = TopValues(c, flat.shape[1], quantile_level(quantile), flat.device)
    top.update(flat)
    masks = compare_to_thresholds(flat, comparison_thresholds(top.thresholds(), ">")[:, None], ">")
    return masks.reshape(c, n, *activations.shape[2:]).transpose(0, 1)


def mask_overlap(activations: torch.Tensor, partition: GroupPartition, *, quantile: float,
                 top_images: int) -> dict[str, float]:
    """Measures of one layer's thresholded activation masks that no CGL loss trains [I] (claims G5, G7).

    `activations`: (N, C, H, W) maps of N images. Each unit's mask is where its map exceeds T_k, the
    unit's top-`quantile` level over all images and positions (Network Dissection's threshold), at
    feature-map resolution. Returns the mean IoU (over images and positions together) of the masks of
    two units of one group (`mask_iou_within`) and of two grouped units of different groups
    (`mask_iou_across`), and `top_area`: the share of the map above T_k in each unit's `top_images`
    images with the largest maximum (the spec's above-T_k region of the top-K images), averaged over the
    grouped units.
    """
    n, c = activations.shape[:2]
    masks = above_threshold(activations, quantile=quantile).transpose(0, 1).reshape(c, -1).float()
    intersection = masks @ masks.T
    size = masks.sum(1)
    union = size[:, None] + size[None, :] - intersection
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.zeros_like(union))
    within, across = _pair_means(iou, partition)
    per_image = masks.reshape(c, n, -1)
    best = activations.float().flatten(2).amax(-1).T.topk(min(top_images, n), dim=1).indices  # (C, K)
    area = per_image.mean(-1).gather(1, best)[: partition.grouped].mean()
    return {"mask_iou_within": within, "mask_iou_across": across, "top_area": float(area)}


def weight_correlation(weight: torch.Tensor, partition: GroupPartition) -> tuple[float, float]:
    """Mean Pearson correlation of two filters' weights within a group and across groups (a collapse
    diagnostic: filters copied inside a group correlate near 1) [I]."""
    flat = weight.detach().flatten(1).double().cpu()
    centred = flat - flat.mean(1, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return _pair_means(unit @ unit.T, partition)


@torch.no_grad()
def group_statistics(model: nn.Module, layers: Sequence[str], dataset: Dataset, *, groups: int = GROUPS,
                     images: int = 256, batch_size: int, device: str | torch.device | None = None,
                     quantile: float = 0.005, top_images: int = 10) -> pd.DataFrame:
    """Per layer on up to `images` held-out images [I]:
    - the trained losses as manipulation checks: mean within-group soft-IoU distance of psi (L_g, G5)
      and mean spatial spread L_s with coordinates in [0, 1] (G7);
    - collapse diagnostics: `psi_variance`, the per-image spatial variance of psi (about 0 for flat
      maps), and the within/across-group weight correlation (`weight_correlation`);
    - untrained measures (`mask_overlap`) on the output of the conv producing each layer (the dissected
      activations): thresholded-mask IoU within and across groups (G5) and the above-T_k area of the top
      images (G7).
    """
    device = runtime.resolve_device(device)
    model = model.to(device).eval()
    subset = torch.utils.data.Subset(dataset, range(min(images, len(dataset))))
    field = SoftReceptiveField().to(device)
    sums = {layer: torch.zeros(3, dtype=torch.float64) for layer in layers}  # psi in the BN form for BN layers
    convs = {layer: producing_conv(model, layer) for layer in layers}  # masks: the dissected conv outputs
    kept: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    count = 0
    with capture_activations(model, list(dict.fromkeys([*layers, *convs.values()]))) as acts:
        for batch, _ in torch.utils.data.DataLoader(subset, batch_size=batch_size):
            model(batch.to(device))
            for layer in layers:
                psi = field.of_layer(model, layer, acts[layer])
                partition = partition_filters(psi.shape[1], groups, min_size=2)
                distance = within_group_distance(psi, partition).mean()
                spread = spatial_spread(psi, normalise_coordinates=True).mean()
                variance = psi[:, : partition.grouped].flatten(2).var(-1).mean()
                sums[layer] += torch.stack([distance, spread, variance]).double().cpu() * len(batch)
                kept[layer].append(acts[convs[layer]].detach().float().cpu())
            count += len(batch)
    rows = []
    for layer, v in sums.items():
        activations = torch.cat(kept[layer])
        partition = partition_filters(activations.shape[1], groups, min_size=2)
        corr_within, corr_across = weight_correlation(model.get_submodule(convs[layer]).weight, partition)
        rows.append({"layer": layer, "within_group_distance": float(v[0] / count), "spatial_spread": float(v[1] / count),
                     "psi_variance": float(v[2] / count), "weight_corr_within": corr_within,
                     "weight_corr_across": corr_across,
                     **mask_overlap(activations, partition, quantile=quantile, top_images=top_images)})
    return pd.DataFrame(rows)


def purity_pairs(purity: pd.DataFrame, variant: str = "cgl") -> pd.DataFrame:
    """G8 per model of `variant`: purity of each layer's most relevant group vs the mean of its other
    groups (layers where either is undefined are left out), averaged over layers [I].

    One row per (arch, seed) with `top`, `others` and `layers` (how many layers took part).
    """
    rows = []
    for (arch, seed), frame in purity[purity.variant == variant].groupby(["arch", "seed"], sort=False):
        tops, others = [], []
        for _, layer in frame.groupby("layer", sort=False):
            top = layer.loc[layer.beta.idxmax()]
            rest = layer.drop(index=top.name).purity.dropna()
            if not np.isnan(top.purity) and len(rest):
                tops.append(top.purity)
                others.append(rest.mean())
        rows.append({"arch": arch, "seed": seed, "top": np.mean(tops) if tops else np.nan,
                     "others": np.mean(others) if others else np.nan, "layers": len(tops)})
    return pd.DataFrame(rows)

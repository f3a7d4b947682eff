"""How well explanation maps agree with ground-truth evidence (validity) and with the model (faithfulness).

Batched torch versions of the field's metrics (Quantus implements each; the tests check these equal
Quantus's on the same inputs: `PointingGame`, `RelevanceMassAccuracy`, `AUC`, `PixelFlipping`). Maps
are N × H × W, masks N × H × W booleans at the same size (`resize_masks` brings evidence masks there).

Validity (spec 02, section 6.1): `pointing_game` (the share of the maximal pixels that lie in the mask, or
within `tolerance` pixels of it: the expected hit when ties at the maximum are broken at random; NaN for a
constant map, which points nowhere), `energy_in_mask` (share of the map's positive mass inside the mask),
`pixel_auroc` (ROC-AUC of the pixel values against the mask, ties averaged), `top_fraction_iou` (IoU of
the top-q share of pixels with the mask). An empty mask scores NaN.

Faithfulness (6.2): `perturbation_curves` removes (deletion) or reveals (insertion) pixels in decreasing
map order, `steps` equal chunks, and records the softmax probability of the target class after each;
`curve_auc` is the trapezoidal area over the fraction of pixels. `randomisation_similarity` is the
sanity check of Adebayo et al.: parameters re-initialised layer by layer from the top, the Spearman
correlation of each image's map with its map under the randomised model.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

from replication.models.surgery import eval_mode
from replication.runtime import resolve_device

MODES = ("deletion", "insertion")


def _check(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"need maps and masks of one shape N x H x W, got {tuple(maps.shape)} and {tuple(masks.shape)}; "
                         "resize the masks with resize_masks.")
    return maps.float().flatten(1), masks.bool().flatten(1)


def _empty_to_nan(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return values.masked_fill(~masks.any(1), float("nan"))


def resize_masks(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """N × h × w evidence masks -> N × H × W booleans (nearest neighbour), the maps' size."""
    return F.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0.5


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, tolerance: int = 0) -> torch.Tensor:
    """Per image the share of the pixels of maximal value that lie in the mask dilated by `tolerance`
    pixels: 1.0 or 0.0 for a single maximum, the expected hit under random tie-breaking for tied maxima
    (coarse maps upsampled bilinearly have plateaus; counting any tied pixel as a hit would let a flat
    map win). A constant map (max = min, see `constant_maps`) and an empty mask score NaN. Equals
    Quantus's `PointingGame` when the maximum is unique (it counts a hit when any tied pixel hits)."""
    flat, _ = _check(maps, masks)
    inside = _dilated(masks, tolerance)
    top = flat == flat.amax(1, keepdim=True)
    share = (top & inside).sum(1) / top.sum(1)
    return _empty_to_nan(share.masked_fill(constant_maps(maps), float("nan")), masks.flatten(1).bool())


def _dilated(masks: torch.Tensor, tolerance: int) -> torch.Tensor:
    """N × H × W masks grown by `tolerance` pixels (a square neighbourhood), flattened to N × HW."""
    if tolerance:
        masks = F.max_pool2d(masks[:, None].float(), 2 * tolerance + 1, 1, tolerance)[:, 0]
    return masks.bool().flatten(1)


def random_map_expectation(masks: torch.Tensor, *, tolerance: int = 0) -> dict[str, torch.Tensor]:
    """Per image the exact expected validity of a map of i.i.d. continuous positive values (the random
    control) against `masks`: pointing game = the share of pixels in the mask dilated by `tolerance` (the
    maximum is at a uniformly random pixel), energy = the mask's share of the pixels (exchangeable values:
    E[Σ_mask r / Σ r] = |mask| / |image|), pixel AUROC = 1/2. NaN for an empty mask, like the metrics."""
    inside = masks.bool().flatten(1)
    share = inside.float().mean(1)
    return {"pointing": _empty_to_nan(_dilated(masks, tolerance).float().mean(1), inside),
            "energy": _empty_to_nan(share, inside),
            "auroc": _empty_to_nan(torch.full_like(share, 0.5).masked_fill(share == 1, float("nan")), inside)}


def constant_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per map (N × H × W) True when every pixel has the same value: it ranks no pixel above another."""
    flat = maps.float().flatten(1)
    return flat.amax(1) == flat.amin(1)


def energy_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image Σ_mask map⁺ / Σ map⁺ (NaN for a map with no positive mass or an empty mask)."""
    flat, inside = _check(maps, masks)
    positive = flat.clamp_min(0)
    total = positive.sum(1)
    share = (positive * inside).sum(1) / total
    return _empty_to_nan(share.masked_fill(total == 0, float("nan")), inside)


def pixel_auroc(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image the ROC-AUC of the pixel values for the mask (Mann-Whitney U / (n₊ n₋), ties at ½)."""
    flat, inside = _check(maps, masks)
    order = flat.argsort(1)
    sorted_values = flat.gather(1, order)
    ranks = torch.empty_like(flat)
    positions = torch.arange(1, flat.shape[1] + 1, dtype=flat.dtype, device=flat.device).expand_as(flat)
    ranks.scatter_(1, order, positions)
    # average ranks within ties: each value's mean position among its equals
    for row in range(len(flat)):
        values, inverse, counts = torch.unique_consecutive(sorted_values[row], return_inverse=True, return_counts=True)
        if len(values) < flat.shape[1]:
            ends = counts.cumsum(0).to(flat.dtype)
            means = ends - (counts.to(flat.dtype) - 1) / 2
            ranks[row, order[row]] = means[inverse]
    positive = inside.sum(1).to(flat.dtype)
    negative = inside.shape[1] - positive
    u = (ranks * inside).sum(1) - positive * (positive + 1) / 2
    auc = u / (positive * negative)
    return _empty_to_nan(auc.masked_fill(negative == 0, float("nan")), inside)


def top_fraction_iou(maps: torch.Tensor, masks: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Per image the IoU of the top `fraction` of pixels (by value, ties by position) with the mask."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction = {fraction}: give a share of the pixels in (0, 1].")
    flat, inside = _check(maps, masks)
    count = max(1, round(fraction * flat.shape[1]))
    top = torch.zeros_like(inside).scatter_(1, flat.argsort(dim=1, descending=True, stable=True)[:, :count], True)
    return _empty_to_nan((top & inside).sum(1) / (top | inside).sum(1), inside)


def _probabilities(model: nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start:start + batch_size].to(device))
            out.append(logits.softmax(1).gather(1, target[start:start + batch_size, None].to(device))[:, 0].cpu())
    return torch.cat(out)


def blurred(images: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """A Gaussian-blurred copy (separable kernel of radius 3 sigma, edges replicated): insertion's start."""
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius,) * 4, mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def perturbation_curves(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, *, mode: str = "deletion",
                        target: torch.Tensor | None = None, steps: int = 16, baseline: float = 0.0,
                        blur_sigma: float = 5.0, batch_size: int = 64,
                        device: str | torch.device | None = None) -> torch.Tensor:
    """N × (steps + 1) probabilities of `target` (default: the predicted class) as the pixels are removed
    (deletion: set to `baseline`; 0 is the normalisation's mean colour, ImageNet's for ImageNet-normalised images) or revealed (insertion: from a
    blurred copy) in decreasing `maps` order (ties by position), in `steps` equal chunks; column 0 is
    the untouched (deletion) or fully blurred (insertion) image."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}.")
    if maps.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"maps {tuple(maps.shape)} do not match images {tuple(images.shape)}: one H x W map per image.")
    device = resolve_device(device)
    pixels = maps[0].numel()
    rank = removal_rank(maps.to(images.device))
    start, end = (images, torch.full_like(images, baseline)) if mode == "deletion" else (blurred(images, blur_sigma), images)
    with eval_mode(model):
        model.to(device)
        if target is None:
            with torch.no_grad():
                target = torch.cat([model(images[s:s + batch_size].to(device)).argmax(1).cpu()
                                    for s in range(0, len(images), batch_size)])
        curves = [_probabilities(model, torch.where(rank < round(k * pixels / steps), end, start), target, batch_size, device)
                  for k in range(steps + 1)]
    return torch.stack(curves, 1)


def removal_rank(maps: torch.Tensor) -> torch.Tensor:
    """N × 1 × H × W: each pixel's place (0 first) in decreasing map order, ties by position, on the maps' device."""
    flat = maps.flatten(1).float()
    rank = torch.empty_like(flat, dtype=torch.long)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(flat).contiguous()
    rank.scatter_(1, flat.argsort(dim=1, descending=True, stable=True), positions)
    return rank.view(-1, 1, *maps.shape[-2:])


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Per curve the trapezoidal area over the fraction of pixels, [0, 1]."""
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), dim=1)


def randomisation_similarity(model: nn.Module, images: torch.Tensor, explainer: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                             *, seed: int = 0, layers: Sequence[str] | None = None) -> pd.DataFrame:
    """The cascading parameter-randomisation check: `explainer(model, images) -> maps` on `model`, then on
    a copy whose `layers` (default every module with its own parameters; a named container stands for every
    module in it) are re-initialised (`reset_parameters`, under a generator seeded by `seed`; the global one is
    restored) from the top down, one more per row. The explainer should explain fixed targets (e.g. the
    original model's predictions), or a map changes only because another class is read. Rows: layer
    randomised last, mean and SD over images of the Spearman correlation of the map with the original; a
    randomised map that became constant has lost the original's ranking and scores 0 (counted in
    `constant_maps`); an image whose original map is constant has no ranking to compare and is left out."""
    import copy
    original = explainer(model, images).flatten(1).numpy()
    names = list(layers) if layers is not None else [
        n for n, m in model.named_modules() if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False))]
    randomised, rows = copy.deepcopy(model), []
    ranked = original.max(1) > original.min(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in reversed(names):
            for module in randomised.get_submodule(name).modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            maps = explainer(randomised, images).flatten(1).numpy()
            flat = maps.max(1) == maps.min(1)
            rho = np.array([0.0 if f else stats.spearmanr(a, b).statistic for a, b, f in zip(original, maps, flat)], dtype=float)
            kept = rho[ranked]
            rows.append({"layer": name, "spearman_mean": float(kept.mean()) if len(kept) else math.nan,
                         "spearman_sd": float(kept.std(ddof=1)) if len(kept) > 1 else math.nan,
                         "constant_maps": int((flat & ranked).sum()), "images": int(ranked.sum())})
    return pd.DataFrame(rows)

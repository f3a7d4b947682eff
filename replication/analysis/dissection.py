"""Network Dissection (Bau et al. 2017) with NetDissect-Lite's tally semantics, exact and vectorised.

For every unit k of a layer (or every direction of a `basis` applied to its channels):

1. threshold T_k = the (1 − quantile) quantile of the unit's activations over all positions of all
   images (`quantile=0.005`: the top 0.5%);
2. the activation map is resized to the annotation resolution (below) and binarised, M_k = S_k > T_k
   (Lite's strict `mask > threshold`): where activations tie exactly at T_k, as on flat synthetic
   fills, the tied positions stay off, so at most about the quantile's share of feature positions fire
   (resizing moves the mask's area a little); `mask_comparison=">="` lets ties fire, which can take
   far more (a unit whose T_k is 0 then fires everywhere). The unit table reports each mask's area,
   `mask_fraction` = active mask pixels / (N·sh·sw), next to `threshold`, to compare with `quantile`;
3. IoU_{k,l} = Σ_x |M_k ∩ L_l| / Σ_x |M_k ∪ L_l| accumulated over the dataset, with Lite's
   category-restricted union (`denominator="overlap"`, feature_operation.py `tally_job`): an image's
   active pixels enter the unit's term for labels of primary category c only when some of them lie
   on a label of c in that image, or the image has a whole-image label of c (so a unit firing where
   no part is annotated is not penalised for part concepts); "image" counts them whenever the image
   carries any label of c (looser: larger terms, lower IoUs), "union" always; whole-image labels
   (scene, texture) cover the whole mask;
4. label = argmax_l IoU (per category and overall); detector when IoU ≥ `iou_threshold`.

Given thresholds. `thresholds=` (one per unit or basis direction) replaces step 1: no quantile is
fitted and the masks are S_k > T_k with the given T_k. It serves thresholds fitted on another split
(S¹/S² label on train and score on val with the train thresholds) and learned linear detectors, whose
own rule w·a > t is a basis row w with threshold t (resizing is a convex combination of the map's
values, so resizing w·a and comparing with t is resizing w·a − t and comparing with 0).

Passes. Pass 1 runs the forward pass once, feeds the exact per-unit quantile state and counts the
label pixels; when the layer's features (float32) and the compacted labels fit `feature_budget_bytes`
they are kept in memory (on `device`) and pass 2 (the tally) replays them, so the network and the
image decoding run once. Otherwise pass 2 runs the loader and the forward pass again, and memory
holds one batch plus the quantile state (below) and the N × K per-image maxima: no copy of the
features, in memory or on disk (NetDissect-Lite writes them all as float64 memory maps).

Quantiles. `quantile_method="exact"` keeps the m = n − ⌊(n − 1)·level⌋ largest values per unit
(n = N·h·w positions, level = 1 − quantile), which is all a linear-interpolation quantile at that
level reads, so the threshold equals `numpy.quantile(x.astype(float64), level)` exactly, with
K·m·4 bytes ≈ quantile × the feature size. When that exceeds `quantile_budget_bytes` ("auto"), a
deterministic compactor sketch is used (sorted buffers of `capacity` values per level, merged pairs
keep alternate elements); its rank error is bounded by Σ 2^level over the compactions done, reported
as `config["quantile_rank_error"]` (a fraction of n), and its memory is K·capacity·4·(levels + 2)
bytes with levels ≈ log2(n / capacity).

Resizing (`resize_maps`). Lite resizes each map to the mask with scipy's `imresize(..., mode='F')`, i.e.
Pillow's float bilinear resize. `upsample="bilinear"` is `F.interpolate(..., mode="bilinear",
align_corners=False)` when the map is not larger than the mask (half-pixel centres; equal to Pillow's
upsampling to float rounding, border included), and with `antialias=True` (default) when it is larger
along a dimension (early layers): Pillow's convolution resize, whose triangle filter widens with the
scale so every map pixel is averaged in (point sampling, `antialias=False`, reads ≤ 2×2 map pixels per
output and skips the rest of a map 4× larger). The original NetDissect anchored a spline at receptive-
field centres and quick-netdissect used layer offsets, so IoUs differ slightly from both.
"bilinear-corners" (align_corners=True) and "nearest" (always point-sampled) are options. Every mode
is a convex combination of the map's values, so maps whose maximum is below T_k cannot fire and are
skipped exactly (Lite's speed trick, vectorised).

Tally, per batch: only the (image, unit) maps that can fire are resized, in one interpolate call per
memory-bounded chunk; intersections with pixel labels are bincounts over (unit, label) pairs at the
positions where the mask is on; whole-image labels add the mask's area through one matrix product;
the "overlap" activation term is one more bincount, over (map, primary category) pairs at the same
positions, plus the categories of each image's whole-image labels.
All tallies are integers on `device`, so CPU and CUDA give identical, order-independent counts.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from replication import io
from replication.analysis.thresholds import (
    COMPARISONS, QUANTILE_METHODS, QUANTILE_RULES, UPSAMPLE_MODES, CompactorSketch, TopValues, compare_to_thresholds,
    comparison_thresholds, quantile_level, resize_maps,
)
from replication.data.broden import broden_loader
from replication.models.hooks import forward_until, get_module
from replication.models.surgery import eval_mode
from replication.runtime import progress, resolve_device

DENOMINATORS = ("overlap", "image", "union")
_CHUNK_ELEMENTS = 1 << 24  # upsampled values held at once by the tally (64 MiB of float32)


# ---------------------------------------------------------------- tally
@dataclass
class _Labels:
    """One batch's annotations, compacted for storage between the passes."""

    pixel: torch.Tensor  # (B·sh·sw)×P, position-major so that one row holds a position's labels; int16/int32
    image: torch.Tensor  # B×L' int64 label numbers, 0 = padding
    present: torch.Tensor  # B×C bool

    @classmethod
    def from_batch(cls, batch: dict, device: torch.device, num_labels: int) -> "_Labels":
        dtype = torch.int16 if num_labels <= torch.iinfo(torch.int16).max else torch.int32
        planes = batch["pixel_labels"]
        count, depth, height, width = planes.shape
        return cls(
            planes.to(device=device, dtype=dtype).permute(0, 2, 3, 1).reshape(count * height * width, depth).contiguous(),
            batch["image_labels"].to(device),
            batch["category_present"].to(device),
        )

    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in (self.pixel, self.image, self.present))


class _Tally:
    """Integer accumulators of Lite's tally: intersections, active pixels, label pixels.

    `unit_category[k, c]` is unit k's activation term for labels of primary category c under
    `denominator`: "overlap" (Lite) adds an image's active pixels when some lie on a label of primary
    category c or the image has a whole-image label of c; "image" adds them when the image carries
    any label of c (`category_present`); "union" adds them always (every column = `unit_total`).
    """

    def __init__(self, units: int, num_labels: int, num_categories: int, mask_size: tuple[int, int],
                 upsample: str, antialias: bool, comparison: str, denominator: str,
                 primary_category: torch.Tensor, device: torch.device):
        self.L, self.C, self.mask_size, self.comparison = num_labels, num_categories, mask_size, comparison
        self.denominator, self.upsample, self.antialias = denominator, upsample, antialias
        # label -> primary category, C (a sink column) for label 0 and labels of no selected category
        primary = torch.as_tensor(primary_category).to(device=device, dtype=torch.int64)
        self.label_category = torch.where(primary >= 0, primary, torch.full_like(primary, num_categories))
        self.intersection = torch.zeros(units, num_labels, dtype=torch.int64, device=device)
        self.unit_category = torch.zeros(units, num_categories, dtype=torch.int64, device=device)
        self.unit_total = torch.zeros(units, dtype=torch.int64, device=device)
        self.label_pixels = torch.zeros(num_labels, dtype=torch.int64, device=device)

    def _image_onehot(self, labels: _Labels) -> torch.Tensor:
        onehot = torch.zeros(labels.image.shape[0], self.L, dtype=torch.float64, device=labels.image.device)
        onehot.scatter_(1, labels.image, 1.0)
        onehot[:, 0] = 0  # padding / unlabelled
        return onehot

    def count_labels(self, labels: _Labels) -> None:
        area = self.mask_size[0] * self.mask_size[1]
        pixel_counts = torch.bincount(labels.pixel.flatten().long(), minlength=self.L)
        pixel_counts[0] = 0
        self.label_pixels += pixel_counts + self._image_onehot(labels).sum(0).long() * area

    def add(self, features: torch.Tensor, labels: _Labels, thresholds: torch.Tensor) -> None:
        """Accumulate one batch; `thresholds` are the float32 comparison thresholds."""
        batch, units = features.shape[:2]
        area = self.mask_size[0] * self.mask_size[1]
        # Conservative pre-filter (a few ulps of slack): skipped maps provably never reach T_k.
        peaks = features.amax(dim=(2, 3))
        slack = thresholds.abs() * 1e-6 + 1e-30
        image_idx, unit_idx = (peaks >= thresholds - slack).nonzero(as_tuple=True)
        active = torch.zeros(batch, units, dtype=torch.int64, device=features.device)
        overlap = self.denominator == "overlap"
        if overlap:  # B × C: the image has a whole-image label of primary category c
            whole = torch.zeros(batch, self.C + 1, dtype=torch.bool, device=features.device)
            whole.scatter_(1, self.label_category[labels.image], True)
            whole = whole[:, : self.C]
        step = max(1, _CHUNK_ELEMENTS // area)
        for start in range(0, len(image_idx), step):
            b, k = image_idx[start : start + step], unit_idx[start : start + step]
            maps = resize_maps(features[b, k][:, None], self.mask_size, self.upsample, self.antialias)[:, 0]
            mask = compare_to_thresholds(maps, thresholds[k, None, None], self.comparison).view(len(b), area)
            which, position = mask.nonzero(as_tuple=True)  # which selected map, where in it
            on_count = torch.bincount(which, minlength=len(b))
            active[b, k] = on_count
            on_labels = labels.pixel.index_select(0, (b * area)[which] + position).long()  # on × planes
            keys = (k * self.L)[which, None] + on_labels  # label 0 (none) lands in column 0, ignored
            self.intersection += torch.bincount(keys.view(-1), minlength=units * self.L).view(units, self.L)
            if overlap:  # per selected map: does any active pixel lie on a label of primary category c?
                hit_keys = which[:, None] * (self.C + 1) + self.label_category[on_labels]
                hits = torch.bincount(hit_keys.view(-1), minlength=len(b) * (self.C + 1)).view(len(b), self.C + 1)
                touched = (hits[:, : self.C] > 0) | whole[b]
                self.unit_category.index_add_(0, k, on_count[:, None] * touched)
        active_f = active.double()
        self.intersection += (active_f.T @ self._image_onehot(labels)).long()
        if self.denominator == "image":
            self.unit_category += (active_f.T @ labels.present.double()).long()
        elif self.denominator == "union":
            self.unit_category += active.sum(dim=0)[:, None]
        self.unit_total += active.sum(dim=0)


# ---------------------------------------------------------------- feature sources
def project_basis(features: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """A'[:, p] = basis @ A[:, p] at every position p of B × K × h × w features (float32)."""
    features = features.float()
    if basis is None:
        return features
    basis = torch.as_tensor(basis).to(device=features.device, dtype=torch.float32)
    if basis.shape[1] != features.shape[1]:
        raise ValueError(
            f"basis has {basis.shape[1]} columns but the layer has {features.shape[1]} channels; "
            "pass a (directions × channels) matrix."
        )
    b, c, h, w = features.shape
    return (basis @ features.reshape(b, c, h * w)).reshape(b, basis.shape[0], h, w)


@dataclass
class _ModelSource:
    model: nn.Module
    layer: str
    device: torch.device
    resident = False

    def passes(self, loader, basis) -> Iterator[tuple[torch.Tensor, dict]]:
        """(features, batch) per batch; the forward stops at `layer` (later layers are not needed)."""
        with eval_mode(self.model), forward_until(self.model, self.layer) as forward:
            for batch in loader:
                outputs = forward(batch["image"].to(self.device, non_blocking=True))
                yield project_basis(outputs[self.layer], basis), batch


@dataclass
class _TensorSource:
    features: torch.Tensor
    device: torch.device
    resident = True

    def slice(self, offset: int, count: int, basis) -> torch.Tensor:
        return project_basis(self.features[offset : offset + count].to(self.device), basis)

    def passes(self, loader, basis) -> Iterator[tuple[torch.Tensor, dict]]:
        offset = 0
        for batch in loader:
            count = len(batch["index"])
            yield self.slice(offset, count, basis), batch
            offset += count


# ---------------------------------------------------------------- result
@dataclass
class Dissection:
    """Result of one dissection: unit table, per-category summary, thresholds, IoU matrix, config.

    `units`: one row per unit (0-based channel or basis direction): `unit, category, label,
    label_number, iou, detector, threshold, mask_fraction` (the fraction of all mask pixels of all
    images where the unit's mask is on: about `quantile` unless ties or resizing move it), then
    `<category>-label` / `<category>-iou` per category.
    `summary`: per category (and `total`) the number of detectors and of unique detectors (distinct
    labels among detectors). `iou`: K × num_labels (NaN for labels outside the scored categories).
    `image_max`: N × K per-image maximum activation (for top-image figures).
    """

    units: pd.DataFrame
    summary: pd.DataFrame
    thresholds: np.ndarray
    iou: np.ndarray
    label_names: list[str]
    categories: list[str]
    counts: dict[str, np.ndarray]
    image_max: np.ndarray
    config: dict = field(default_factory=dict)

    @property
    def unique_detectors(self) -> int:
        return int(self.summary.set_index("category").loc["total", "unique_detectors"])

    def save(self, folder: str | Path) -> Path:
        """Write units.csv, summary.csv, iou.csv and dissection.json (config, thresholds), each atomically."""
        folder = Path(folder)
        io.write_csv(folder / "units.csv", self.units)
        io.write_csv(folder / "summary.csv", self.summary)
        scored = [l for l in range(len(self.label_names)) if not np.isnan(self.iou[:, l]).all()]
        iou = pd.DataFrame(self.iou[:, scored], columns=[self.label_names[l] for l in scored])
        io.write_csv(folder / "iou.csv", iou.rename_axis("unit").reset_index())
        io.write_json(folder / "dissection.json", {"config": self.config, "thresholds": self.thresholds.tolist()})
        return folder


def activation_masks(features: torch.Tensor, dissection: Dissection) -> torch.Tensor:
    """Binary masks (B × K × sh × sw) of features already in the dissected basis, as the tally made them."""
    config = dissection.config
    thresholds = comparison_thresholds(torch.as_tensor(dissection.thresholds, device=features.device),
                                        config["mask_comparison"])
    maps = resize_maps(features.float(), config["mask_size"], config["upsample"], config.get("antialias", False))
    return compare_to_thresholds(maps, thresholds[:, None, None], config["mask_comparison"])


@dataclass(frozen=True)
class DissectionConfig:
    """A profile's [dissection] section: the Broden `split` dissected (None = all images), the batch
    size of the dissection passes, and the method's `quantile` and `iou_threshold` (the original
    Network Dissection's values by default)."""

    batch_size: int
    split: str | None = "val"
    quantile: float = 0.005
    iou_threshold: float = 0.04

    def dissect_keywords(self) -> dict[str, float | int]:
        """`quantile`, `iou_threshold` and `batch_size` as keywords of `dissect` and `dissect_features`
        (`split` is not one of them: it chose the dataset)."""
        return {"quantile": self.quantile, "iou_threshold": self.iou_threshold, "batch_size": self.batch_size}


@dataclass(frozen=True)
class DissectionOptions:
    """The method's choices besides quantile and IoU threshold (spec section 10), defaults as the spec.

    `quantile_rule` "exact" (level 1 − quantile) or "lite" (994/999); `quantile_method` "exact" (top-m,
    exact), "sketch" (bounded memory) or "auto" (exact while it fits `quantile_budget_bytes`);
    `upsample` one of UPSAMPLE_MODES; `antialias`: maps larger than the mask (early layers) are
    averaged down as PIL's resize does in Lite (True) or point-sampled (False; see `resize_maps`);
    `denominator`, the unit's activation term of a label's union:
    "overlap" (Lite: an image's active pixels count for category c only when some of them lie on a
    label of c or the image has a whole-image label of c), "image" (they count whenever the image
    carries any label of c: looser, larger terms) or "union" (always: the plain union);
    `mask_comparison` ">" (M = S > T, Lite's `mask > threshold`: positions tied at T do not fire) or
    ">=" (ties fire: on flat fills the mask can take far more than the quantile's share);
    `detector_comparison` ">=" (IoU ≥ threshold) or ">";
    `feature_budget_bytes` bounds the features and labels kept between the passes (beyond it the
    forward pass runs twice); `sketch_capacity` the sketch's buffer size (default: from the budget).
    """

    quantile_rule: str = "exact"
    quantile_method: str = "auto"
    upsample: str = "bilinear"
    antialias: bool = True
    denominator: str = "overlap"
    mask_comparison: str = ">"
    detector_comparison: str = ">="
    feature_budget_bytes: int = 1 << 30
    quantile_budget_bytes: int = 256 << 20
    sketch_capacity: int | None = None
    num_workers: int = 0

    def __post_init__(self):
        for name, allowed in (
            ("quantile_rule", QUANTILE_RULES),
            ("quantile_method", QUANTILE_METHODS),
            ("upsample", tuple(UPSAMPLE_MODES)),
            ("denominator", DENOMINATORS),
            ("mask_comparison", COMPARISONS),
            ("detector_comparison", COMPARISONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; use one of {allowed}.")
        if not isinstance(self.antialias, bool):
            raise ValueError(f"antialias must be True or False; got {self.antialias!r}.")

    @classmethod
    def from_keywords(cls, options: dict) -> "DissectionOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown dissection option(s) {unknown}; valid: {sorted(known)}.")
        return cls(**options)


def scored_categories(dataset, categories: Sequence[str] | None) -> list[str]:
    """The dataset's categories to score, in the dataset's order (all when `categories` is None)."""
    if categories is None:
        return list(dataset.categories)
    categories = [categories] if isinstance(categories, str) else list(categories)
    unknown = [c for c in categories if c not in dataset.categories]
    if unknown:
        raise ValueError(
            f"categories {unknown} are not in the dataset (it has {list(dataset.categories)}); "
            "build the dataset with them or drop them."
        )
    return [c for c in dataset.categories if c in categories]


def dissect(
    model: nn.Module,
    layer: str,
    dataset,
    *,
    categories: Sequence[str] | None = None,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    basis: torch.Tensor | None = None,
    thresholds: torch.Tensor | np.ndarray | None = None,
    **options,
) -> Dissection:
    """Dissect `layer` of `model` on a Broden-format `dataset` (see the module docstring).

    The model is moved to `device` and run in eval mode (its mode is restored). `basis`
    (D_out × channels) dissects the directions basis @ a instead of the channels a (rotations,
    learned bases). `thresholds` (one per unit or direction) replaces the quantile rule (module
    docstring, "Given thresholds"). `options`: the fields of `DissectionOptions`.
    """
    settings = DissectionOptions.from_keywords(options)
    device = resolve_device(device)
    get_module(model, layer)  # fail fast on a bad name
    model.to(device)
    return _dissect(_ModelSource(model, layer, device), dataset, layer=layer, categories=categories,
                    quantile=quantile, iou_threshold=iou_threshold, batch_size=batch_size, device=device,
                    basis=basis, thresholds=thresholds, options=settings)


def dissect_features(
    features: torch.Tensor,
    dataset,
    *,
    categories: Sequence[str] | None = None,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    basis: torch.Tensor | None = None,
    thresholds: torch.Tensor | np.ndarray | None = None,
    layer: str = "features",
    **options,
) -> Dissection:
    """Dissect precomputed (or planted) feature maps `features` (N × K × h × w, in dataset order).

    Same semantics, `basis`, `thresholds` and `options` as `dissect`; `layer` only names the result.
    """
    settings = DissectionOptions.from_keywords(options)
    if features.ndim != 4 or features.shape[0] != len(dataset):
        raise ValueError(
            f"features must be N × K × h × w with N = len(dataset) = {len(dataset)}; got shape {tuple(features.shape)}."
        )
    device = resolve_device(device)
    return _dissect(_TensorSource(features, device), dataset, layer=layer, categories=categories, quantile=quantile,
                    iou_threshold=iou_threshold, batch_size=batch_size, device=device, basis=basis,
                    thresholds=thresholds, options=settings)


@torch.no_grad()
def _dissect(source, dataset, *, layer, categories, quantile, iou_threshold, batch_size, device, basis, thresholds,
             options: DissectionOptions) -> Dissection:
    level = quantile_level(quantile, options.quantile_rule)
    scored = scored_categories(dataset, categories)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty; choose a split or categories that keep some images.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    if basis is not None:
        basis = torch.as_tensor(basis).to(device=device, dtype=torch.float32)
        if basis.ndim != 2:
            raise ValueError(f"basis must be a (directions × channels) matrix; got shape {tuple(basis.shape)}.")
    given = _given_thresholds(thresholds, device)
    mask_size = tuple(int(s) for s in dataset.mask_size)
    num_labels = int(dataset.num_labels)
    loader = broden_loader(dataset, batch_size=batch_size, num_workers=options.num_workers)
    n_images = len(dataset)

    # Pass 1: forward once; quantile state, label counts, per-image maxima; keep batches if they fit.
    stored: list[tuple[int, torch.Tensor | None, _Labels]] | None = []
    image_max, offset, quantiles, tally = [], 0, None, None  # quantiles stay None when thresholds are given
    for features, batch in progress(source.passes(loader, basis), desc=f"dissect {layer}: pass 1",
                                    total=len(loader)):
        labels = _Labels.from_batch(batch, device, num_labels)
        units, height, width = features.shape[1:]
        if tally is None:
            if given is not None and len(given) != units:
                raise ValueError(f"{len(given)} thresholds were given for {units} units or directions; "
                                 "pass one threshold per unit (per basis row).")
            if given is None:
                quantiles = _quantile_state(units, n_images * height * width, level, options, device)
            per_image = labels.nbytes() / len(labels.present) + (0 if source.resident else units * height * width * 4)
            if per_image * n_images > options.feature_budget_bytes:
                stored = None
            tally = _Tally(units, num_labels, len(dataset.categories), mask_size, options.upsample, options.antialias,
                           options.mask_comparison, options.denominator, dataset.primary_category, device)
        if quantiles is not None:
            quantiles.update(features.permute(1, 0, 2, 3).reshape(units, -1))
        tally.count_labels(labels)
        image_max.append(features.amax(dim=(2, 3)))
        if stored is not None:
            stored.append((offset, None if source.resident else features, labels))
        offset += len(labels.present)
    thresholds = given if quantiles is None else quantiles.thresholds()
    compare_at = comparison_thresholds(thresholds, options.mask_comparison)

    # Pass 2: the tally, from memory or by running the forward pass again.
    if stored is not None:
        replay = ((source.slice(o, len(l.present), basis) if f is None else f, l) for o, f, l in stored)
    else:
        replay = ((f, _Labels.from_batch(b, device, num_labels)) for f, b in source.passes(loader, basis))
    for features, labels in progress(replay, desc=f"dissect {layer}: pass 2", total=len(loader)):
        tally.add(features, labels, compare_at)
    forward_passes = 1 if stored is not None else 2
    del stored, replay  # release the kept batches before building the result

    config = {
        **asdict(options), "layer": layer, "quantile": quantile, "quantile_level": level,
        "threshold_source": "quantile" if quantiles is not None else "given",
        "quantile_method": quantiles.method if quantiles is not None else None,
        "quantile_rank_error": quantiles.rank_error / quantiles.n if quantiles is not None else 0.0,
        "iou_threshold": iou_threshold, "categories": scored, "n_images": n_images, "feature_shape": [units, height, width],
        "mask_size": list(mask_size), "basis_shape": None if basis is None else list(basis.shape),
        "forward_passes": forward_passes, "seed": None,
    }
    return _result(tally, thresholds, dataset, scored, torch.cat(image_max).cpu().numpy(), config)


def _quantile_state(units: int, n: int, level: float, options: DissectionOptions, device: torch.device):
    """Exact top values while they fit `quantile_budget_bytes` ("auto"), else the bounded-memory sketch."""
    method, budget = options.quantile_method, options.quantile_budget_bytes
    if method == "exact" or (method == "auto" and TopValues.bytes_needed(units, n, level) <= budget):
        return TopValues(units, n, level, device)
    capacity = options.sketch_capacity or max(1024, budget // (units * 4 * 40))  # up to 38 levels fit the budget
    return CompactorSketch(units, n, level, capacity)


def _given_thresholds(thresholds, device: torch.device) -> torch.Tensor | None:
    """Given per-unit thresholds as a float64 vector on `device` (None: fit the quantile rule)."""
    if thresholds is None:
        return None
    given = torch.as_tensor(np.asarray(thresholds.detach().cpu() if torch.is_tensor(thresholds) else thresholds,
                                       dtype=np.float64)).to(device)
    if given.ndim != 1 or not bool(torch.isfinite(given).all()):
        raise ValueError(f"thresholds must be a vector of finite numbers, one per unit; got shape {tuple(given.shape)}.")
    return given


def _result(tally: _Tally, thresholds: torch.Tensor, dataset, scored: list[str], image_max: np.ndarray,
            config: dict) -> Dissection:
    """IoU from the tallies, per-category and overall labels, detectors and the summary."""
    tally.intersection[:, 0] = 0  # label 0 = unlabelled; the tally lets it collect the unlabelled positions
    intersection = tally.intersection.cpu().double()
    label_pixels = tally.label_pixels.cpu().double()
    primary = torch.as_tensor(dataset.primary_category).long().cpu()
    unit_term = tally.unit_category.cpu().double()[:, primary.clamp(min=0)]  # the rule's activation term
    denominator = unit_term + label_pixels - intersection
    iou = torch.where(denominator > 0, intersection / denominator.clamp(min=1), torch.zeros(()))
    category_of = {c: dataset.categories.index(c) for c in scored}
    is_scored = torch.zeros(len(primary), dtype=torch.bool)
    for index in category_of.values():
        is_scored |= primary == index
    is_scored[0] = False
    iou[:, ~is_scored] = math.nan

    names = list(dataset.label_names)
    units = iou.shape[0]
    detector_op = (lambda v: v >= config["iou_threshold"]) if config["detector_comparison"] == ">=" else (
        lambda v: v > config["iou_threshold"])
    table = {}
    for category, index in category_of.items():
        scores = torch.where(primary == index, iou.nan_to_num(-1.0), torch.full_like(iou, -1.0))
        value, label = scores.max(dim=1)
        table[f"{category}-label"] = [names[l] if v >= 0 else "" for l, v in zip(label.tolist(), value.tolist())]
        table[f"{category}-iou"] = value.clamp(min=0).numpy()
    overall_value, overall_label = iou.nan_to_num(-1.0).max(dim=1)
    label_category = primary[overall_label]
    head = pd.DataFrame({
        "unit": np.arange(units),
        "category": [dataset.categories[c] if v >= 0 else "" for c, v in zip(label_category.tolist(), overall_value.tolist())],
        "label": [names[l] if v >= 0 else "" for l, v in zip(overall_label.tolist(), overall_value.tolist())],
        "label_number": overall_label.numpy(),
        "iou": overall_value.clamp(min=0).numpy(),
        "detector": detector_op(overall_value).numpy() & (overall_value >= 0).numpy(),
        "threshold": thresholds.cpu().numpy(),
        "mask_fraction": tally.unit_total.cpu().double().numpy() / (config["n_images"] * math.prod(config["mask_size"])),
    })
    frame = pd.concat([head, pd.DataFrame(table)], axis=1)

    rows = []
    for category in [*scored, "total"]:
        chosen = frame[frame.detector] if category == "total" else frame[frame.detector & (frame.category == category)]
        rows.append({"category": category, "detectors": len(chosen), "unique_detectors": chosen.label.nunique()})
    counts = {
        "intersection": tally.intersection.cpu().numpy(),
        "unit_category": tally.unit_category.cpu().numpy(),
        "unit_total": tally.unit_total.cpu().numpy(),
        "label_pixels": tally.label_pixels.cpu().numpy(),
    }
    return Dissection(units=frame, summary=pd.DataFrame(rows), thresholds=thresholds.cpu().numpy(),
                      iou=iou.numpy(), label_names=names, categories=scored, counts=counts,
                      image_max=image_max, config=config)

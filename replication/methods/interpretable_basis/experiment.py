"""Scoring a basis of one layer the way paper 04 does, through the shared dissection: dissect the
directions on the train split, label them there, dissect them again on the val split and read S¹/S²
(`score_basis`); and the comparison of the four bases on one layer of a network (`compare_bases`).

Binarisation (shared spec section 5): learned detectors (UIBE, IBD) use their own rule on both splits
(`LinearDetectors`: w·a > t); the natural basis and rotations use the quantile rule, its thresholds
fitted on the train split and reused on val. Features come from `analysis.features.layer_features`.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from replication.analysis.dissection import Dissection, DissectionConfig, dissect_features
from replication.analysis.features import DEFAULT_MAX_BYTES, layer_features
from replication.analysis.rotation import random_rotation
from replication.methods.interpretable_basis.detectors import LinearDetectors, pixel_matrix
from replication.methods.interpretable_basis.ibd import IBDBasis, IBDConfig, cell_labels, fit_ibd
from replication.methods.interpretable_basis.metrics import direction_table, one_hotness, s_by_category, s_scores
from replication.methods.interpretable_basis.uibe import UIBEBasis, UIBEConfig, fit_uibe
from replication.runtime import resolve_device


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


@dataclass
class BasisComparison:
    """Paper 04's comparison on one layer: `scores` per basis (natural, random rotation, UIBE, IBD),
    their `table` (S¹, S², counts at the IoU threshold) and `one_hot` (claim U1 on val pixels), and the
    fitted `uibe` and `ibd` bases."""

    layer: str
    scores: dict[str, BasisScores]
    table: pd.DataFrame
    one_hot: pd.DataFrame
    uibe: UIBEBasis
    ibd: IBDBasis


def compare_bases(model: nn.Module, layer: str, train_set, val_set, *, config: DissectionConfig,
                  uibe: UIBEConfig = UIBEConfig(), ibd: IBDConfig = IBDConfig(), seed: int = 0, rotation_seed: int = 0,
                  categories=None, device: str | torch.device | None = None,
                  max_bytes: int = DEFAULT_MAX_BYTES, **options) -> BasisComparison:
    """Fit UIBE (on the train split's pixels, `seed`) and IBD (train split, its own concepts as labels)
    on `layer`'s features (shared `layer_features`, batches of `config.batch_size`), and score them
    with the natural basis and a random rotation (`rotation_seed`) by `score_basis`. One-hotness on
    the val pixels: UIBE and IBD with their own logits, the natural basis and the rotation under UIBE's
    parametrisation with b and M fitted on train (`fit_uibe(basis=...)`)."""
    device = resolve_device(device)
    keywords = dict(batch_size=config.batch_size, device=device, max_bytes=max_bytes)
    train_features = layer_features(model, [layer], train_set, **keywords)[layer]
    val_features = layer_features(model, [layer], val_set, **keywords)[layer]
    train_pixels, val_pixels = pixel_matrix(train_features), pixel_matrix(val_features)
    dim = train_pixels.shape[1]
    rotation = random_rotation(dim, rotation_seed)
    fitted = fit_uibe(train_pixels, uibe, seed=seed, device=device)
    cells = cell_labels(train_set, tuple(train_features.shape[-2:]), batch_size=config.batch_size)
    probes = fit_ibd(train_pixels, cells, train_set, ibd, seed=seed, device=device)
    score = dict(config=config, categories=categories, device=device, **options)
    scores = {
        "natural": score_basis("natural", train_features, val_features, train_set, val_set, **score),
        "random rotation": score_basis("random rotation", train_features, val_features, train_set, val_set,
                                       basis=rotation, **score),
        "UIBE": score_basis("UIBE", train_features, val_features, train_set, val_set,
                            detectors=fitted.detectors(), **score),
        "IBD": score_basis("IBD", train_features, val_features, train_set, val_set, detectors=probes.detectors(),
                           labels=probes.labels, **score),
    }
    logits = {
        "natural": fit_uibe(train_pixels, uibe, seed=seed, device=device, basis=torch.eye(dim, dtype=torch.float64)),
        "random rotation": fit_uibe(train_pixels, uibe, seed=seed, device=device, basis=rotation),
        "UIBE": fitted,
    }
    one_hot = [{"basis": name, **one_hotness(basis.logits(val_pixels, batch_size=config.batch_size * 64, device=device))}
               for name, basis in logits.items()]
    one_hot.append({"basis": "IBD", **one_hotness(probes.detectors().scores(val_pixels.double()).float())})
    return BasisComparison(layer, scores, scores_table(list(scores.values())), pd.DataFrame(one_hot), fitted, probes)

"""Scoring a basis of one layer the way paper 04 does, through the shared dissection: dissect the
directions on the train split, label them there, dissect them again on the val split and read S¹/S².

Binarisation (shared spec section 5): learned detectors (UIBE, IBD) use their own rule on both splits
(`LinearDetectors`: w·a > t); the natural basis and rotations use the quantile rule, its thresholds
fitted on the train split and reused on val. Features come from `analysis.features.layer_features`.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from replication.analysis.dissection import Dissection, DissectionConfig, dissect_features
from replication.methods.interpretable_basis.detectors import LinearDetectors
from replication.methods.interpretable_basis.metrics import direction_table, s_by_category, s_scores


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

"""Notebook 04's figures: S¹/S² per basis, and the IoU-threshold curves whose integrals they are.
Top images per learned direction come from the shared `analysis.dissection_figures.plot_top_images`
(pass `basis=detectors.weight`, the basis the dissection used)."""
from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from replication.methods.interpretable_basis.experiment import BasisScores
from replication.methods.interpretable_basis.metrics import s_integrands


def plot_scores(table: pd.DataFrame, *, title: str = "Basis interpretability (val split)"):
    """Bars of S¹ and S² per basis from rows `basis, s1, s2` (several rows per basis, e.g. seeds: mean ± SD)."""
    grouped = table.groupby("basis", sort=False)[["s1", "s2"]]
    mean, spread = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
    positions = np.arange(len(mean))
    fig, ax = plt.subplots()
    for offset, column, label in ((-0.2, "s1", "S¹ (directions)"), (0.2, "s2", "S² (unique concepts)")):
        ax.bar(positions + offset, mean[column], width=0.4, yerr=spread[column], capsize=3, label=label)
    ax.set_xticks(positions, mean.index)
    seeds = grouped.size().max()
    ax.set(ylabel="score" + (f" (mean ± SD over {seeds} seeds)" if seeds > 1 else ""), title=title)
    ax.legend()
    return fig


def plot_threshold_curves(scores: Mapping[str, BasisScores], *, iou_threshold: float = 0.04):
    """Per basis, the S¹ integrand (directions with val IoU ≥ ξ, solid) and the S² integrand (distinct
    concepts among them, dashed) against ξ; the areas under the curves are S¹ and S²."""
    fig, ax = plt.subplots()
    for index, (name, result) in enumerate(scores.items()):
        points = np.unique(np.concatenate([[0.0, 1.0], result.table.val_iou.clip(0, 1)]))
        counts = pd.DataFrame([s_integrands(result.table, xi) for xi in points])
        colour = f"C{index}"  # 1[a ≥ ξ] is left-continuous: the count at an IoU value holds back to the previous one
        ax.step(points, counts.detectors, where="pre", color=colour,
                label=f"{name}: S¹ {result.scores['s1']:.2f}, S² {result.scores['s2']:.2f}")
        ax.step(points, counts.unique_detectors, where="pre", color=colour, ls="--")
    ax.axvline(iou_threshold, color="grey", lw=1, ls=":", label=f"ξ = {iou_threshold} (Network Dissection)")
    ax.set(xlabel="IoU threshold ξ", ylabel="directions (solid) / unique concepts (dashed) with IoU ≥ ξ",
           xlim=(0, max(0.1, float(max(r.table.val_iou.max() for r in scores.values())) * 1.1)),
           title="The integrands of S¹ and S²")
    ax.legend(fontsize=8)
    return fig

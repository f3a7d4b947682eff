"""Notebook 00's tables and figures of training and the world, and its rotation claim, on hand-made tables."""
from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

from replication.reporting.claims import load_reference
from replication.reporting.dissection_claims import rotation_claim
from replication.reporting.training_figures import plot_confusion, plot_learning_curves
from replication.reporting.world_figures import coverage_summary

matplotlib.use("agg")
REFERENCE = load_reference("00_concept_world")


def rotation(falls, arch: str = "net", layer: str = "conv") -> pd.DataFrame:
    """Unique detectors 10 at alpha 0 and 10 - fall at alpha 1, one model per fall (seed = position)."""
    return pd.DataFrame([{"arch": arch, "layer": layer, "model_seed": seed, "alpha": alpha, "unique_detectors": 10 - fall * alpha,
                          "detectors": 12} for seed, fall in enumerate(falls) for alpha in (0.0, 0.5, 1.0)])


@pytest.mark.parametrize("falls, verdict", [
    ((4, 5, 6), "confirmed"),
    ((-4, -5, -6), "refuted"),
    ((3, -3, 0), "inconclusive"),
    ((4,), "inconclusive"),  # one seed: no interval
])
def test_rotation_claim_each_branch(falls, verdict):
    row = rotation_claim(rotation(falls), REFERENCE, profile="ci")
    assert row.verdict == verdict and row.claim_id == "D1" and row.note.startswith("REDUCED")
    assert row.unit == f"training seeds, n={len(falls)}"
    assert row.ours.startswith(f"net conv: unique detectors at alpha 0: 10.00, at alpha 1: {10 - np.mean(falls):.2f}; fall ")


def test_rotation_claim_judges_each_network_and_combines_them():
    """Two networks: one falls clearly, one does not move; one Holm family, verdicts combined."""
    row = rotation_claim(pd.concat([rotation((4, 5, 6), "a", "x"), rotation((1, -1, 0), "b", "y")]), REFERENCE, profile="ci")
    assert row.verdict == "partly confirmed" and row.unit == "training seeds, n=3 per network, 2 networks"
    first, second = row.ours.split("; fall ")[1:]  # texts follow each network's "fall "
    assert "-> confirmed" in first and "b y: unique detectors" in first and second.endswith("-> inconclusive")


def test_training_figures_draw_every_run_and_class():
    histories = pd.DataFrame([{"arch": arch, "seed": seed, "epoch": e, "train_acc": 0.1 * e, "val_acc": 0.09 * e}
                              for arch in ("a", "b") for seed in (0, 1) for e in (1, 2, 3)])
    figure = plot_learning_curves(histories)
    assert [len(ax.lines) for ax in figure.axes] == [4, 4]
    confusion = np.array([[3, 1], [0, 4]])
    figure = plot_confusion(confusion, ["x", "y"], title="t")
    texts = sorted(t.get_text() for t in figure.axes[0].texts)
    assert texts == ["1", "3", "4"]  # zero cells stay blank


def test_coverage_summary_counts_capped_concepts_and_the_lowest_uncapped_ceiling():
    coverage = pd.DataFrame({"category": ["part", "part", "scene", "scene"], "concept": ["a", "b", "s", "t"],
                             "images": [10, 30, 50, 50], "coverage": [0.01, 0.03, 0.5, 0.5],
                             "iou_ceiling": [0.5, 0.17, 0.01, 0.01], "capped_by_design": ["", "", "whole image", "whole image"]})
    summary = coverage_summary(coverage, targets={"part": 0.2, "scene": 0.1})
    assert list(summary.index) == ["part", "scene"]
    assert summary.loc["part"].tolist() == [2, 0, 20.0, 2.0, 0.2, 0.17]
    assert summary.loc["scene", "capped by design"] == 2 and np.isnan(summary.loc["scene", "lowest ceiling (uncapped)"])

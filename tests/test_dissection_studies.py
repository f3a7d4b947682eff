"""Studies over several dissections: depth summary and the rotation test, on the tiny Broden fixture."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from replication.analysis.dissection import DissectionConfig
from replication.analysis.dissection import Dissection
from replication.analysis.dissection_studies import (concept_detection, depth_summary, layer_summary, plot_rotation_study,
                                                     rotation_study)
from replication.analysis.features import dissect_layers
from replication.data.broden import BrodenDataset
from tests.broden_fixture import write_tiny_broden


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> BrodenDataset:
    return BrodenDataset(write_tiny_broden(tmp_path_factory.mktemp("broden")).root)


CONFIG = DissectionConfig(batch_size=8)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1))


def test_layer_summary_has_one_row_per_layer_in_order(dataset):
    results = dissect_layers(_model(), ["2", "0"], dataset, config=CONFIG, device="cpu")
    summary = layer_summary(results)
    assert list(summary.index) == ["2", "0"] and "total" in summary.columns
    assert summary.loc["0", "total"] == results["0"].unique_detectors


def test_depth_summary_averages_seeds_per_arch_and_layer(dataset):
    results = dissect_layers(_model(), ["2", "0"], dataset, config=CONFIG, device="cpu")
    twice = {("net", 0): results, ("net", 1): results}
    summary = depth_summary(twice, "detectors")
    assert list(summary.index) == [("net", "2"), ("net", "0")]
    assert summary.loc[("net", "0"), "total"] == layer_summary(results, "detectors").loc["0", "total"]


def test_rotation_power_zero_is_the_unit_basis(dataset):
    model = _model()
    study = rotation_study(model, "2", dataset, alphas=[0.0, 1.0], seed=3, config=CONFIG, device="cpu")
    natural = dissect_layers(model, ["2"], dataset, config=CONFIG, device="cpu")["2"]
    assert study.loc[0, "unique_detectors"] == natural.unique_detectors
    assert study.loc[0, "mean_best_iou"] == pytest.approx(natural.units["iou"].mean())
    assert list(study["alpha"]) == [0.0, 1.0] and set(study["rotation_seed"]) == {3}


def test_rotation_study_counts_unique_detectors_per_category(dataset):
    study = rotation_study(_model(), "2", dataset, alphas=[0.0, 1.0], seed=3, config=CONFIG, device="cpu")
    per_category = study.filter(like="unique_").drop(columns="unique_detectors")
    assert list(per_category.columns) == [f"unique_{c}" for c in dataset.categories]
    assert (per_category.sum(axis=1) >= study["unique_detectors"]).all()  # a label of two categories counts twice
    figure = plot_rotation_study(study.assign(unique_color=[1, 2]), title="t")
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()][:2] == ["total", "color"]


LABELS = ["-", "red", "car", "wheel"]


def _hand_dissection(detectors: list[tuple[str, str]], iou_rows: list[list[float]]) -> Dissection:
    """A dissection whose units are the given (category, label) detectors, with the given IoU rows."""
    units = pd.DataFrame({"unit": range(len(detectors)), "category": [c for c, _ in detectors],
                          "label": [l for _, l in detectors], "detector": [True] * len(detectors)})
    return Dissection(units=units, summary=pd.DataFrame(), thresholds=np.zeros(len(detectors)),
                      iou=np.array(iou_rows, dtype=float), label_names=LABELS, categories=["color", "object", "part"],
                      counts={}, image_max=np.zeros((0, len(detectors))))


def test_concept_detection_counts_seeds_layers_and_best_iou():
    """Exact answers on hand-made dissections: car is detected in layer b of seed 0 only, wheel nowhere."""
    nan = float("nan")
    dissections = {
        ("net", 0): {"a": _hand_dissection([("color", "red")], [[nan, 0.10, 0.02, 0.01]]),
                     "b": _hand_dissection([("object", "car")], [[nan, 0.00, 0.30, 0.03]])},
        ("net", 1): {"a": _hand_dissection([("color", "red")], [[nan, 0.20, 0.04, 0.01]]),
                     "b": _hand_dissection([("part", "wheel")], [[nan, 0.00, 0.10, nan]])},
    }
    concepts = pd.DataFrame({"category": ["object", "part", "color"], "concept": ["car", "wheel", "red"]})
    table = concept_detection(dissections, concepts)
    assert list(table["concept"]) == ["car", "wheel", "red"]
    assert list(table["net seeds"]) == [1, 1, 2]
    assert list(table["net layers"]) == ["b", "b", "a"]
    assert table["net best_iou"].tolist() == pytest.approx([(0.30 + 0.10) / 2, (0.03 + 0.01) / 2, (0.10 + 0.20) / 2])


def test_concept_detection_matches_the_category_too():
    """A detector labelled "car" under another category does not detect the object car."""
    dissections = {("net", 0): {"a": _hand_dissection([("part", "car")], [[0.0, 0.0, 0.5, 0.0]])}}
    table = concept_detection(dissections, pd.DataFrame({"category": ["object"], "concept": ["car"]}))
    assert table.loc[0, "net seeds"] == 0 and table.loc[0, "net layers"] == ""

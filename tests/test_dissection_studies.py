"""Studies over several dissections: depth summary and the rotation test, on the tiny Broden fixture."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from replication.analysis.dissection import DissectionConfig
from replication.analysis.dissection_studies import layer_summary, rotation_study
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


def test_rotation_power_zero_is_the_unit_basis(dataset):
    model = _model()
    study = rotation_study(model, "2", dataset, alphas=[0.0, 1.0], seed=3, config=CONFIG, device="cpu")
    natural = dissect_layers(model, ["2"], dataset, config=CONFIG, device="cpu")["2"]
    assert study.loc[0, "unique_detectors"] == natural.unique_detectors
    assert list(study["alpha"]) == [0.0, 1.0] and set(study["rotation_seed"]) == {3}

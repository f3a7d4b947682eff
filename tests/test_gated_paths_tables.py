"""Notebook 05's tables (`gated_paths.placement_table`, `training_table`, `path_accuracy_table`,
`hit_rate_table`, `diversity_table`) and `save_paths`, on hand-built networks and results with exact answers."""
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from replication.methods import gated_paths as gp
from tests.helpers import assert_close

LOCATIONS = [gp.GateLocation(name="a", channels=4, height=8, width=8),
             gp.GateLocation(name="b", channels=6, height=2, width=2)]


def plain_model() -> nn.Module:
    """A model read as a plain (VGG-style) network: its layers are a `features` Sequential."""
    model = nn.Module()
    model.features = nn.Sequential(nn.Conv2d(3, 4, 1))
    return model


def residual_model() -> nn.Module:
    """A model read as a residual network: it has `layer1` and `layer4`."""
    model = nn.Module()
    model.layer1, model.layer4 = nn.Identity(), nn.Identity()
    return model


def network(model: nn.Module, history: pd.DataFrame | None = None, locations=LOCATIONS, arch: str = "net",
            seed: int = 0) -> gp.Network:
    return gp.Network(model=model, arch=arch, seed=seed, key={}, history=history, locations=list(locations))


def result(*, accuracy: pd.DataFrame | None = None, empty_layers: int = 0, hit_summary: pd.DataFrame | None = None,
           control_summary: pd.DataFrame | None = None, similarity: torch.Tensor | None = None,
           paths: gp.PathSet | None = None) -> gp.ArchitectureResult:
    """One network's result with only the fields a table reads."""
    return gp.ArchitectureResult(arch="net", family="plain", paths=paths, accuracy=accuracy, hits=None, control_hits=None,
                                 hit_summary=hit_summary, control_summary=control_summary, similarity=similarity,
                                 empty_layers=empty_layers, misclassification=None)


def test_placement_table_lists_each_archs_first_network():
    networks = {"vgg_s0": network(plain_model(), arch="vgg"), "vgg_s1": network(plain_model(), arch="vgg", seed=1),
                "res_s0": network(residual_model(), locations=LOCATIONS[1:], arch="res")}
    expected = pd.DataFrame({"arch": ["vgg", "res"], "family": ["plain", "residual"], "gates": [2, 1],
                             "units": [10, 6], "channels": ["4 6", "6"], "spatial": ["8 2", "2"]})
    pd.testing.assert_frame_equal(gp.placement_table(networks), expected)


def test_training_table_reads_the_last_epoch_and_marks_pretrained_networks():
    history = pd.DataFrame({"train_acc": [0.5, 0.75], "val_acc": [0.5, 2 / 3], "seconds": [30.0, 60.0]})
    table = gp.training_table({"trained": network(plain_model(), history, seed=3), "pretrained": network(plain_model())})
    assert table["train_minutes"].iloc[0] == 1.5 and math.isnan(table["train_minutes"].iloc[1])
    assert table["network"].tolist() == ["trained", "pretrained"] and table["seed"].tolist() == [3, 0]
    assert table["epochs"].tolist() == [2, 0] and table["train_acc"].iloc[0] == 75.0
    assert_close(table["val_acc"].iloc[0], 200 / 3) and math.isnan(table["val_acc"].iloc[1])
    assert table["plateaued"].tolist() == [False, False]  # two epochs are no plateau; pretrained has no curve


def test_path_accuracy_table_means_over_classes():
    accuracy = pd.DataFrame({"class_id": [0, 1], "original_accuracy": [1.0, 0.5], "path_accuracy": [0.75, 0.25],
                             "agreement": [1.0, 0.5], "original_false_positive": [0.0, 0.25],
                             "path_false_positive": [0.5, 0.25], "units_kept": [0.5, 0.25]})
    table = gp.path_accuracy_table({"a": result(accuracy=accuracy, empty_layers=3),
                                    "b": result(accuracy=accuracy.iloc[:1], empty_layers=0)})
    expected = pd.DataFrame({"network": ["a", "b"], "original_accuracy": [0.75, 1.0], "path_accuracy": [0.5, 0.75],
                             "agreement": [0.75, 1.0], "original_false_positive": [0.125, 0.0],
                             "path_false_positive": [0.375, 0.5], "units_kept": [0.375, 0.5], "empty_layer_pairs": [3, 0]})
    pd.testing.assert_frame_equal(table, expected)


def hit_summary(hit_rates) -> pd.DataFrame:
    """A two-layer summary as `summarize_hit_rates` returns it."""
    return pd.DataFrame({"layer": [0, 1], "location": ["a", "b"], "hit_rate": hit_rates, "hit_std": [0.1, 0.2],
                         "n_mosaics": [10, 10], "empty_maps": [0, 1], "depth": [0.0, 1.0]})


def test_hit_rate_table_puts_the_control_beside_each_networks_hit_rates():
    results = {"a": result(hit_summary=hit_summary([0.5, 0.75]), control_summary=hit_summary([0.25, 0.125])),
               "b": result(hit_summary=hit_summary([1.0, 0.0]), control_summary=hit_summary([0.5, 0.5]))}
    expected = pd.DataFrame({"network": ["a", "a", "b", "b"], "layer": [0, 1, 0, 1], "location": ["a", "b", "a", "b"],
                             "depth": [0.0, 1.0, 0.0, 1.0], "hit_rate": [0.5, 0.75, 1.0, 0.0],
                             "hit_std": [0.1, 0.2, 0.1, 0.2], "control": [0.25, 0.125, 0.5, 0.5],
                             "n_mosaics": [10, 10, 10, 10], "empty_maps": [0, 1, 0, 1]}, index=[0, 1, 0, 1])
    pd.testing.assert_frame_equal(gp.hit_rate_table(results), expected)


def test_diversity_table_joins_diversity_its_se_and_the_mean_concepts_on_paths():
    # off-diagonal similarity (0.2, 0.4, 0.6): diversity 1 - 0.4 = 0.6; leave-one-out diversities 0.4, 0.6,
    # 0.8 give the jackknife SE sqrt(2/3 * 0.08); a uniform 0.5 has diversity 0.5 and SE 0
    varied = torch.tensor([[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]])
    uniform = torch.tensor([[1.0, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 1.0]])
    concepts = pd.DataFrame({"class_id": [0, 1, 2], "distinct_concepts": [1, 2, 6], "own_concepts_found": [0.0, 0.5, 1.0]})
    full = gp.PathSet([0, 1, 2], LOCATIONS[:1], [torch.ones(3, 4)], {})  # every unit on every path
    table = gp.diversity_table({"a": result(similarity=varied, paths=full), "b": result(similarity=uniform, paths=full)},
                               {"b": concepts.iloc[:2], "a": concepts}, n_random=3)
    assert list(table.columns) == ["network", "path_diversity", "diversity_se", "random_diversity", "random_diversity_sd",
                                   "distinct_concepts", "own_concepts_found"]
    assert list(table["network"]) == ["b", "a"]  # the order of the concept tables
    assert table["random_diversity"].tolist() == [0.0, 0.0]  # full random paths are all identical
    assert_close(table["path_diversity"].tolist(), [0.5, 0.6], atol=1e-6)  # float32 similarities
    assert_close(table["diversity_se"].tolist(), [0.0, math.sqrt(2 / 3 * 0.08)], atol=1e-6)
    assert table["distinct_concepts"].tolist() == [1.5, 3.0] and table["own_concepts_found"].tolist() == [0.25, 0.5]


def test_save_paths_writes_one_file_per_network(tmp_path):
    paths = gp.PathSet(classes=[3], locations=LOCATIONS[:1], logits=[torch.tensor([[1.0, -1.0, 2.0, 0.0]])], config={})
    gp.save_paths({"vgg": paths}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paths_vgg.pt"]
    loaded = gp.PathSet.load(tmp_path / "paths_vgg.pt")
    assert loaded.classes == [3] and loaded.locations == LOCATIONS[:1] and torch.equal(loaded.logits[0], paths.logits[0])


def test_recipes_are_searched_once_per_arch_borrowed_by_recipe_from_and_not_searched_for_a_fine_tuned_network(
        monkeypatch):
    from replication.methods.gated_paths import experiment
    from replication.models.backbones import BackboneConfig
    from replication.training.loop import TrainConfig

    searched = []

    def select_recipe(root, model, train, search, *, device=None):
        searched.append(model.arch)
        return TrainConfig(epochs=len(searched), batch_size=8, lr=0.1), None

    monkeypatch.setattr(experiment, "select_recipe", select_recipe)
    settings = gp.NADSettings(archs=("resnet18", "densenet121", "efficientnet_lite0"),
                              recipe_from={"densenet121": "resnet18"},
                              train_overrides={"efficientnet_lite0": {"lr": 0.01}})
    base = TrainConfig(epochs=30, batch_size=64, lr=0.05)
    recipes = gp.training_recipes(settings, "world", model_config=BackboneConfig(), train_config=base,
                                  search=object())
    assert searched == ["resnet18"]
    assert recipes["densenet121"] == recipes["resnet18"] == TrainConfig(epochs=1, batch_size=8, lr=0.1)
    assert recipes["efficientnet_lite0"] == TrainConfig(epochs=30, batch_size=64, lr=0.01)


def test_each_network_is_analysed_under_its_arch_so_that_n6_can_pair_networks_of_one_arch(monkeypatch):
    from replication.methods.gated_paths import experiment

    monkeypatch.setattr(experiment, "analyse_architecture", lambda model, arch, paths, *args, **kwargs: (arch, paths))
    networks = {f"resnet18_s{seed}": gp.Network(residual_model(), "resnet18", seed, {}, None, LOCATIONS) for seed in (0, 1)}
    images = gp.ClassImages(None, None, [0], train={}, val={})
    results = gp.analyse_networks(networks, {"resnet18_s1": "paths of s1"}, images, [], gp.NADSettings(),
                                  mosaic_size=8, batch_size=4)
    assert results == {"resnet18_s1": ("resnet18", "paths of s1")}

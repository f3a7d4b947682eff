"""NAD gated paths: placement per the spec's table, exact identity gates, the official objective and
step, batched == sequential search, path IoU, mosaics and the hit rate on constructed mosaics."""
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import replication  # noqa: F401  (before torchvision)
import torchvision

from replication.data import concept_world as cw
from replication.data.classification import ClassificationDataset
from replication.methods import gated_paths as gp
from replication.methods.gated_paths import experiment as nad_experiment
from replication.methods.gated_paths import search as nad_search
from replication.models.backbones import BackboneConfig, build_backbone
from replication.training.classifiers import RecipeSearch
from replication.training.loop import TrainConfig
from tests.helpers import assert_close

# Spec section 3.1 table, at a 224-px input: (channels, spatial size) per gate location.
SPEC_TABLE = {
    "vgg16": [(64, 224), (64, 112), (128, 112), (128, 56), (256, 56), (256, 56), (256, 28), (512, 28),
              (512, 28), (512, 14), (512, 14), (512, 14), (512, 7)],
    "resnet50": [(64, 56)] + [(256, 56)] * 3 + [(512, 28)] * 4 + [(1024, 14)] * 6 + [(2048, 7)] * 3,
    "densenet121": [(64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (1024, 7)],
}
SPEC_TOTALS = {"vgg16": 4224, "resnet50": 15168, "densenet121": 3776}
SIZE = 32  # a 32-px probe keeps the big torchvision models cheap; spatial sizes scale by 32/224


@pytest.fixture(scope="module")
def official_models():
    torch.manual_seed(0)
    return {name: getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
            for name in ("vgg16", "resnet50", "densenet121")}


@pytest.mark.parametrize("arch", ["vgg16", "resnet50", "densenet121"])
def test_gate_placement_matches_spec_table(official_models, arch):
    locations = gp.gate_locations(official_models[arch], (3, SIZE, SIZE))
    expected = [(c, s * SIZE // 224) for c, s in SPEC_TABLE[arch]]
    assert [(loc.channels, loc.height) for loc in locations] == expected
    assert all(loc.height == loc.width for loc in locations)
    assert sum(loc.channels for loc in locations) == SPEC_TOTALS[arch]


def test_gate_placement_names(official_models):
    names = [loc.name for loc in gp.gate_locations(official_models["vgg16"], (3, SIZE, SIZE))]
    assert names == [f"features.{i}" for i in (1, 4, 6, 9, 11, 13, 16, 18, 20, 23, 25, 27, 30)]
    dense = [(loc.name, loc.relu_after) for loc in gp.gate_locations(official_models["densenet121"], (3, SIZE, SIZE))]
    assert dense == [("features.pool0", False)] + [
        (f"features.{kind}{i}", False) for i in (1, 2, 3) for kind in ("denseblock", "transition")] + [
        ("features.norm5", True)]
    resnet18 = torchvision.models.resnet18(weights=None, num_classes=2)
    assert [loc.name for loc in gp.gate_locations(resnet18, (3, SIZE, SIZE))] == ["maxpool"] + [
        f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]


@pytest.mark.parametrize("arch, count", [("vgg16", 13), ("vgg16_bn", 13), ("resnet18", 9), ("densenet121", 8)])
def test_placement_on_small_project_backbones(arch, count):
    model = build_backbone(arch, 5, small_input=True, width=0.125).eval()
    locations = gp.gate_locations(model, (3, 32, 32))
    assert len(locations) == count
    if arch.startswith("vgg"):  # the first pool became nn.Identity and keeps its gate
        assert locations[1].height == locations[0].height == 32
    with torch.no_grad(), gp.gated(model, locations) as hooks:
        x = torch.randn(2, 3, 32, 32)
        hooks.set(gp.ones_gates(locations))
        gated_logits = model(x)
    assert torch.equal(gated_logits, model(x).detach())


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot read the layers of Linear"):
        gp.gate_locations(nn.Linear(2, 2), (2,))
    with pytest.raises(ValueError, match="no beta known for architecture 'mlp'"):
        gp.official_beta("mlp")
    assert gp.official_beta("resnet18") == gp.OFFICIAL_BETA["imagenet"]["resnet50"]


@pytest.mark.parametrize("arch", ["vgg16", "resnet50", "densenet121", "resnet18"])
def test_all_one_hard_gates_reproduce_original_logits_exactly(official_models, arch):
    torch.manual_seed(1)
    model = official_models.get(arch) or torchvision.models.resnet18(weights=None, num_classes=10).eval()
    locations = gp.gate_locations(model, (3, SIZE, SIZE))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
        with gp.gated(model, locations) as hooks:
            hooks.set(gp.ones_gates(locations))
            assert torch.equal(model(x), expected)
            hooks.set(None)
            assert torch.equal(model(x), expected)
            closed = gp.ones_gates(locations)
            closed[0] = torch.zeros_like(closed[0])
            hooks.set(closed)
            assert not torch.equal(model(x), expected)
            assert hooks.outputs[locations[0].name].abs().sum() == 0
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


class TinyPlain(nn.Module):
    """A small VGG-style net (conv-BN-ReLU, pool, global pool) for search tests."""

    def __init__(self, n_classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Linear(32, n_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def tiny_setup(sizes=(5, 9, 16, 3)):
    torch.manual_seed(0)
    model = TinyPlain(len(sizes))
    with torch.no_grad():
        model.features[1].running_mean.uniform_(-0.2, 0.2)
        model.features[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    class_images = {c: torch.randn(n, 3, 8, 8, generator=gen) + 0.5 * c for c, n in enumerate(sizes)}
    locations = gp.gate_locations(model, (3, 8, 8))
    return model, locations, class_images


def test_tiny_placement_and_locations():
    _, locations, _ = tiny_setup()
    assert [(loc.name, loc.channels, loc.height) for loc in locations] == [
        ("features.2", 4, 8), ("features.5", 6, 4), ("features.7", 8, 4)]


def test_last_plain_gate_equals_a_gate_after_the_average_pool():
    model, locations, _ = tiny_setup()
    after_pool = locations[:-1] + [gp.GateLocation("avgpool", 8, 2, 2)]
    gates = [(torch.rand(3, loc.channels, generator=torch.Generator().manual_seed(i)) > 0.5).float()
             for i, loc in enumerate(locations)]
    rows = torch.tensor([0, 1, 2])
    x = torch.randn(3, 3, 8, 8)
    outputs = []
    with torch.no_grad():
        for placement in (locations, after_pool):
            with gp.gated(model, placement) as hooks:
                hooks.set(gates, rows)
                outputs.append(model(x))
    assert torch.equal(outputs[0], outputs[1])


def test_class_path_loss_known_value():
    config = gp.PathSearchConfig(beta=2.0)
    logits = torch.zeros(2, 3)
    labels = torch.tensor([1, 1])
    correct = torch.tensor([True, False])
    gated = {"a": torch.tensor([1.0, 3.0]).view(2, 1, 1, 1), "b": torch.ones(2, 1, 1, 1)}
    original = {"a": torch.zeros(2, 1, 1, 1), "b": torch.ones(2, 1, 1, 1)}
    gate_logits = [torch.zeros(5), torch.zeros(7)]  # sigmoid = 0.5 -> mean square 0.25 per layer
    loss = gp.class_path_loss(logits, gated, original, labels, correct, gate_logits, config)
    assert_close(loss, (math.log(3) + 1.0) / 2 + 2.0 * 0.25)
    clean = gp.PathSearchConfig(beta=2.0, divide_ce_by_layers=False, mse_on_correct_only=False)
    loss = gp.class_path_loss(logits, gated, original, labels, correct, gate_logits, clean)
    assert_close(loss, math.log(3) + (1.0 + 9.0) / 2 / 2 + 2.0 * 0.25)


def test_sample_mse_value_and_its_one_pass_gradient_by_hand():
    output = torch.tensor([[1.0, 2.0], [0.0, 4.0]]).view(2, 1, 1, 2).requires_grad_(True)
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    mse = nad_search._sample_mse(output, target)
    assert_close(mse, [(1 + 4) / 2, (1 + 9) / 2])
    (grad,) = torch.autograd.grad((mse * torch.tensor([1.0, 2.0])).sum(), output)
    assert_close(grad.flatten(1), [[1.0, 2.0], [-2.0, 6.0]])  # weight * 2 (output - target) / 2


def test_each_step_moves_every_layer_by_lr():
    model, locations, class_images = tiny_setup()
    config = gp.PathSearchConfig(beta=1.0, epochs=1, batch_size=16, skip_batches_without_correct=False)
    start = nad_search._class_plans([2], [16], locations, config)[0].init
    paths = gp.find_paths_sequential(model, locations, class_images, [2], config=config, device="cpu")
    for before, after in zip(start, paths.logits):
        assert_close((after[0] - before).norm(), 0.1, atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(),
    dict(skip_batches_without_correct=False, mse_on_correct_only=False, divide_ce_by_layers=False),
    dict(seeding="sequential", gate_function="straight_through"),
])
def test_batched_search_equals_sequential(options):
    model, locations, class_images = tiny_setup()
    config = gp.PathSearchConfig(beta=0.5, epochs=2, batch_size=4, **options)
    sequential = gp.find_paths_sequential(model, locations, class_images, config=config, device="cpu")
    batched = gp.search_paths(model, locations, class_images, config=config, device="cpu")
    chunked = gp.search_paths(model, locations, class_images, config=config, device="cpu", class_chunk=3,
                              original_cache_bytes=0)  # the original net's outputs recomputed every step
    init = nad_search._class_plans(list(class_images), [len(v) for v in class_images.values()], locations, config)
    moved = [float((seq - torch.stack([p.init[l] for p in init])).abs().max()) for l, seq in
             enumerate(sequential.logits)]
    assert min(moved) > 0.05, "the search must actually move the gates for this test to mean anything"
    for seq, bat, chk in zip(sequential.logits, batched.logits, chunked.logits):
        assert_close(bat, seq, atol=1e-5)
        assert_close(chk, seq, atol=1e-5)
    assert batched.classes == sequential.classes == [0, 1, 2, 3]


def test_stopping_rule_is_per_class_and_equal_in_both_loops():
    """With a flip-rate rule every class stops on its own epoch; the batched search (with classes that
    stop early dropping out of the batch) still equals the sequential loop, trace included."""
    model, locations, class_images = tiny_setup()
    config = gp.PathSearchConfig(beta=0.5, epochs=30, batch_size=4, stop_flip_rate=0.05, stop_patience=2,
                                 min_epochs=3)
    sequential = gp.find_paths_sequential(model, locations, class_images, config=config, device="cpu")
    batched = gp.search_paths(model, locations, class_images, config=config, device="cpu", class_chunk=3)
    for seq, bat in zip(sequential.logits, batched.logits):
        assert_close(bat, seq, atol=1e-5)
    seq_trace = sequential.trace.sort_values(["class_id", "epoch"]).reset_index(drop=True)
    bat_trace = batched.trace.sort_values(["class_id", "epoch"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(bat_trace, seq_trace, atol=1e-5)
    last = seq_trace.groupby("class_id").tail(config.stop_patience)
    epochs_run = seq_trace.groupby("class_id")["epoch"].max()
    assert epochs_run.nunique() > 1 and epochs_run.max() < config.epochs, "classes must stop, and not together"
    assert (epochs_run >= config.min_epochs).all()
    assert (last["flip_rate"] < config.stop_flip_rate).all()
    first = seq_trace[seq_trace["epoch"] == 1]
    assert (first["steps"] <= [2, 3, 4, 1]).all() and first["steps"].sum() > 0  # ceil(n / 4) batches, less skipped ones
    agreement = sequential.init_agreement().set_index("class_id")["agreement"]
    assert_close(torch.tensor(agreement.to_numpy()), torch.tensor(seq_trace.groupby("class_id")["init_agreement"].last().to_numpy()))


def test_extended_search_equals_a_search_run_with_the_higher_cap_from_the_start():
    """A search capped at 5 epochs, continued to 12, gives the paths and trace of a 12-epoch search:
    classes the rule stopped keep their paths, the others go on with the draws they would have had."""
    model, locations, class_images = tiny_setup()
    config = gp.PathSearchConfig(beta=0.5, epochs=12, batch_size=4, stop_flip_rate=0.05, stop_patience=2, min_epochs=3)
    full = gp.search_paths(model, locations, class_images, config=config, device="cpu")
    short = gp.search_paths(model, locations, class_images, config=dataclasses.replace(config, epochs=5), device="cpu")
    extended = gp.extend_search(model, locations, class_images, short, config=config, device="cpu", class_chunk=1)
    epochs_run = full.trace.groupby("class_id")["epoch"].max()
    assert (epochs_run < 5).any() and (epochs_run > 5).any(), "some classes must stop before the first cap, some after it"
    for a, b in zip(full.logits, extended.logits):
        assert_close(b, a, atol=1e-5)
    pd.testing.assert_frame_equal(extended.trace.reset_index(drop=True),
                                  full.trace.sort_values(["class_id", "epoch"]).reset_index(drop=True), atol=1e-5)
    assert extended.config == full.config
    stopped = gp.stopped_by_rule(full.trace, config)
    assert stopped.eq(epochs_run < config.epochs).all()
    again = gp.extend_search(model, locations, class_images, extended, config=config, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(again.logits, extended.logits))


def test_stopped_by_rule_reads_the_trailing_calm_epochs():
    config = gp.PathSearchConfig(beta=1.0, epochs=5, stop_flip_rate=0.1, stop_patience=2, min_epochs=4)
    trace = pd.DataFrame({"class_id": [0] * 3 + [1] * 5 + [2] * 5 + [3] * 5,
                          "epoch": [1, 2, 3] + [1, 2, 3, 4, 5] * 3,
                          "flip_rate": [0.5, 0.05, 0.05,  # calm twice but before min_epochs: still running
                                        0.5, 0.05, 0.05, 0.05, 0.2,  # the last epoch broke the calm: capped
                                        0.5, 0.5, 0.5, 0.05, 0.05,  # calm at the cap: the rule stopped it there
                                        0.5, 0.05, 0.05, 0.05, 0.05]})
    assert gp.stopped_by_rule(trace, config).to_dict() == {0: False, 1: False, 2: True, 3: True}
    fixed = dataclasses.replace(config, stop_flip_rate=None)
    assert not gp.stopped_by_rule(trace, fixed).any()


def test_extend_search_refuses_other_settings_and_order_dependent_seeding():
    model, locations, class_images = tiny_setup()
    config = gp.PathSearchConfig(beta=0.5, epochs=2, batch_size=4)
    short = gp.search_paths(model, locations, class_images, [0, 1], config=config, device="cpu")
    with pytest.raises(ValueError, match="higher epoch cap and nothing else"):
        gp.extend_search(model, locations, class_images, short, config=dataclasses.replace(config, epochs=4, beta=1.0))
    with pytest.raises(ValueError, match="higher epoch cap and nothing else"):
        gp.extend_search(model, locations, class_images, short, config=dataclasses.replace(config, epochs=1))
    sequential = dataclasses.replace(config, seeding="sequential")
    short = gp.search_paths(model, locations, class_images, [0, 1], config=sequential, device="cpu")
    with pytest.raises(ValueError, match="per_class"):
        gp.extend_search(model, locations, class_images, short, config=dataclasses.replace(sequential, epochs=4))


def test_fixed_schedule_runs_every_epoch_and_init_agreement_starts_at_one():
    model, locations, class_images = tiny_setup()
    config = gp.PathSearchConfig(beta=0.5, epochs=3, batch_size=4)
    paths = gp.search_paths(model, locations, class_images, config=config, device="cpu")
    assert paths.trace.groupby("class_id")["epoch"].max().eq(3).all()
    untouched = gp.search_paths(model, locations, class_images, config=gp.PathSearchConfig(beta=0.5, epochs=0), device="cpu")
    assert untouched.init_agreement()["agreement"].eq(1.0).all()
    with pytest.raises(ValueError, match="stop_flip_rate"):
        gp.PathSearchConfig(beta=1.0, stop_flip_rate=1.5)


def test_skipped_batches_leave_gates_untouched():
    model, locations, class_images = tiny_setup()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([100.0, 0, 0, 0]))  # everything predicted as class 0
    config = gp.PathSearchConfig(beta=1.0, epochs=2, batch_size=4)
    plans = nad_search._class_plans([0, 1], [5, 9], locations, config)
    paths = gp.search_paths(model, locations, class_images, [0, 1], config=config, device="cpu")
    for l, logits in enumerate(paths.logits):
        assert not torch.equal(logits[0], plans[0].init[l])
        assert torch.equal(logits[1], plans[1].init[l])


def test_search_rejects_training_mode_and_missing_classes():
    model, locations, class_images = tiny_setup()
    config = gp.PathSearchConfig(beta=1.0, epochs=1)
    with pytest.raises(ValueError, match="no training images for classes \\[7\\]"):
        gp.search_paths(model, locations, class_images, [0, 7], config=config, device="cpu")
    with pytest.raises(ValueError, match="eval mode"):
        gp.search_paths(model.train(), locations, class_images, config=config, device="cpu")
    with pytest.raises(ValueError, match="seeding must be one of"):
        gp.PathSearchConfig(beta=1.0, seeding="global")


def test_pathset_paths_units_and_roundtrip(tmp_path):
    _, locations, _ = tiny_setup()
    logits = [torch.tensor([[1.0, -1, 2, -3], [-1, -1, -1, -1]]), torch.ones(2, 6), -torch.ones(2, 8)]
    paths = gp.PathSet([3, 5], locations, logits, {"beta": 1.0})
    assert paths.paths()[0].tolist() == [[True, False, True, False], [False] * 4]
    kept = paths.units_kept()
    assert kept.query("class_id == 3 and layer == 0")["fraction"].item() == 0.5
    assert kept.query("layer == 1")["fraction"].tolist() == [1.0, 1.0]
    loaded = gp.PathSet.load(paths.save(tmp_path / "paths.pt"))
    assert loaded.classes == [3, 5] and loaded.locations == locations
    assert all(torch.equal(a, b) for a, b in zip(loaded.logits, logits))
    with pytest.raises(KeyError, match="class 4 has no path"):
        paths.row(4)


def test_path_accuracy_with_open_gates_equals_original():
    model, locations, class_images = tiny_setup()
    open_paths = gp.PathSet([0, 1, 2, 3], locations, [torch.ones(4, loc.channels) for loc in locations], {})
    table = gp.path_accuracy(model, open_paths, class_images, batch_size=4, device="cpu")
    with torch.no_grad():
        expected = [float((model(class_images[c]).argmax(1) == c).float().mean()) for c in range(4)]
    assert table["original_accuracy"].tolist() == expected
    assert table["path_accuracy"].tolist() == expected
    assert table["units_kept"].tolist() == [1.0] * 4


def test_path_accuracy_specificity_catches_a_path_that_only_biases():
    """A path that closes every gate leaves only the classifier's bias: it 'keeps' its own class's
    accuracy at 1 but labels every other class's image as its class too (false positive 1)."""
    model, locations, class_images = tiny_setup()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
        original = {c: model(class_images[c]).argmax(1) for c in range(4)}
    logits = [torch.ones(4, loc.channels) for loc in locations]
    logits[-1][2] = -1.0  # class 2's path closes the last location
    table = gp.path_accuracy(model, gp.PathSet([0, 1, 2, 3], locations, logits, {}), class_images,
                             batch_size=5, device="cpu").set_index("class_id")
    assert table.loc[2, "path_accuracy"] == 1.0 and table.loc[2, "path_false_positive"] == 1.0
    assert table.loc[2, "agreement"] == pytest.approx(float((original[2] == 2).float().mean()))
    others = torch.cat([original[c] for c in (0, 1, 3)])
    assert table.loc[2, "original_false_positive"] == pytest.approx(float((others == 2).float().mean()))
    for c in (0, 1, 3):  # open paths: the original's behaviour exactly
        assert table.loc[c, "agreement"] == 1.0
        assert table.loc[c, "path_false_positive"] == table.loc[c, "original_false_positive"]


def test_path_iou_similarity_and_empty_layers():
    layer0 = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    layer1 = torch.tensor([[1, 0], [1, 0], [0, 0]], dtype=torch.bool)
    iou, empty = gp.path_iou([layer0, layer1])
    assert_close(iou[0], [[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, 1]])
    assert_close(iou[1], [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert empty[:, 2, 2].all() and empty.sum() == 2
    similarity = gp.path_similarity([layer0, layer1])
    assert_close(similarity[0, 1], (1 / 3 + 1) / 2)
    assert_close(gp.path_similarity([layer0, layer1], empty_value=0.0)[2, 2], 0.0)
    assert_close(gp.path_diversity(similarity), 1 - (2 / 3 + 0 + 0) / 3)


def test_group_similarity_and_misclassification_ranks():
    similarity = torch.tensor([[1.0, 0.9, 0.2, 0.5], [0.9, 1, 0.3, 0.1], [0.2, 0.3, 1, 0.8], [0.5, 0.1, 0.8, 1]])
    groups = gp.group_similarity(similarity, ["a", "a", "b", "b"])
    assert_close(groups["within"], (0.9 + 0.8) / 2)
    assert_close(groups["between"], (0.2 + 0.5 + 0.3 + 0.1) / 4)
    classes = [10, 11, 12, 13]
    ranks = gp.misclassification_ranks(similarity, classes, [10, 10, 10], [11, 13, 12])
    assert_close(ranks, [1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="classified correctly"):
        gp.misclassification_ranks(similarity, classes, [10], [10])


def ramp_dataset():
    """Class c's image: channel c holds distinct values 1..64 (an 8x8 ramp), other channels 0."""
    ramp = torch.arange(1.0, 65.0).view(8, 8)
    images = []
    for c in range(4):
        image = torch.zeros(4, 8, 8)
        image[c] = ramp
        images.append(image)
    return images


def identity_net():
    model = nn.Module()
    model.features = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False))
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.forward = lambda x: model.avgpool(model.features(x)).flatten(1)
    with torch.no_grad():
        for conv in (model.features[0], model.features[2]):
            conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
    return model.eval()


@pytest.mark.parametrize("quantize", [True, False])
def test_hit_rate_on_constructed_mosaics(quantize):
    model = identity_net()
    location = gp.GateLocation("features.1", 4, 16, 16)
    own_channel = [torch.where(torch.eye(4, dtype=torch.bool)[c], 1.0, -1.0) for c in range(4)]
    paths = gp.PathSet([0, 1, 2, 3], [location], [torch.stack(own_channel)], {})
    mosaics = [gp.Mosaic((0, 1, 2, 3), (0, 1, 2, 3)), gp.Mosaic((3, 1, 0, 2), (3, 1, 0, 2))]
    kwargs = dict(mosaic_size=16, quantize_uint8=quantize, batch_size=1, device="cpu")
    hits = gp.hit_rates(model, paths, ramp_dataset(), mosaics, **kwargs)
    assert len(hits) == 8 and hits["hit"].tolist() == [1.0] * 8
    control = gp.hit_rates(model, paths, ramp_dataset(), mosaics, path_shift=1, **kwargs)
    assert control["hit"].tolist() == [0.0] * 8
    summary = gp.summarize_hit_rates(hits)
    assert summary[["hit_rate", "hit_std", "n_mosaics", "empty_maps"]].values.tolist() == [[1.0, 0.0, 2, 0]]


def test_strict_threshold_on_flat_maps_selects_nothing():
    flat = torch.zeros(1, 16, 16)
    flat[0, :8, :8] = 5.0  # one uniform quadrant: 64 tied top values, k = 25
    strict = gp.top_fraction_mask(flat, 16, quantize_uint8=True)
    assert strict.sum() == 0 and torch.isnan(gp.quadrant_share(strict, 0)).all()
    exact = gp.top_fraction_mask(flat, 16, quantize_uint8=False)
    assert exact.sum() == 25 and gp.quadrant_share(exact, 0).item() == 1.0
    upsampled = gp.top_fraction_mask(torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]), 16, quantize_uint8=False)
    assert gp.quadrant_share(upsampled, 1).item() == 1.0


def test_mosaic_tensor_and_sampling():
    images = [torch.full((3, 4, 4), float(q)) for q in range(4)]
    grid = gp.mosaic_tensor(images, 8)
    for q in range(4):
        r, c = divmod(q, 2)
        assert (grid[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4] == q).all()
    small = gp.mosaic_tensor(images, 4)
    assert small.shape == (3, 4, 4) and small[0, 0, 0] == 0 and small[0, 3, 3] == 3
    labels = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    mosaics = gp.sample_mosaics(labels, [0, 1, 2, 3, 4], 20, seed=5)
    assert mosaics == gp.sample_mosaics(labels, [0, 1, 2, 3, 4], 20, seed=5)
    assert mosaics != gp.sample_mosaics(labels, [0, 1, 2, 3, 4], 20, seed=6)
    for m in mosaics:
        assert len(set(m.classes)) == 4 and [labels[i] for i in m.indices] == list(m.classes)
    with pytest.raises(ValueError, match="at least 4 distinct classes"):
        gp.sample_mosaics(labels, [0, 1, 2], 3, seed=0)


def test_images_by_class_reads_dict_items():
    dataset = [{"image": torch.full((3, 2, 2), float(i)), "class_id": i % 2} for i in range(5)]
    loaded = gp.images_by_class(dataset, [d["class_id"] for d in dataset], [1, 0], batch_size=2)
    assert loaded[0][:, 0, 0, 0].tolist() == [0.0, 2.0, 4.0] and loaded[1][:, 0, 0, 0].tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="class 9 has no images"):
        gp.images_by_class(dataset, [d["class_id"] for d in dataset], [9])


def test_path_concepts_known_answer():
    locations = [gp.GateLocation("a", 3, 1, 1), gp.GateLocation("b", 2, 1, 1)]
    units = {"a": pd.DataFrame({"unit": [0, 1, 2], "label": ["red", "car", "sky"], "detector": [True, True, False]}),
             "b": pd.DataFrame({"unit": [1, 0], "label": ["street", "red"], "detector": [True, True]})}
    logits = [torch.tensor([[1.0, 1, 1], [-1, -1, 1]]), torch.tensor([[1.0, 1], [-1, -1]])]
    paths = gp.PathSet([0, 1], locations, logits, {})
    table = gp.path_concepts(paths, units, {0: ["red", "car", "street", "body"], 1: ["sky"]}, n_random=5, seed=0)
    first, second = table.iloc[0], table.iloc[1]
    assert (first["path_units"], first["path_detectors"], first["distinct_concepts"]) == (5, 4, 3)
    assert first["own_concepts_found"] == 0.75 == first["own_concepts_found_random"]  # whole network = path
    assert (second["path_units"], second["path_detectors"], second["own_concepts_found"]) == (1, 0, 0.0)
    assert second["own_concepts_found_all_units"] == 0.0  # 'sky' unit is no detector
    only_b = gp.path_concepts(paths, {"b": units["b"]}, {0: ["red"]}, n_random=1)
    assert only_b["path_units"].tolist() == [2, 0] and only_b["own_concepts_found"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="must be keyed by gate locations"):
        gp.path_concepts(paths, {"c": units["a"]}, {})


def test_class_hit_rates_largest_dip_and_curve_distance():
    hits = pd.DataFrame({"class_id": [0, 0, 0, 1, 1, 1, 0], "layer": [0, 1, 2, 0, 1, 2, 2],
                         "hit": [0.3, 0.6, 0.4, 0.5, 0.9, np.nan, 0.2]})
    table = gp.class_hit_rates(hits)
    assert table.to_numpy().tolist()[0] == pytest.approx([0.3, 0.6, 0.3])  # layer 2: mean of 0.4 and 0.2
    assert table.loc[1, 0] == 0.5 and np.isnan(table.loc[1, 2])  # an empty map is skipped, not counted as a miss
    assert gp.deep_hit_rates(hits, last=2).tolist() == pytest.approx([0.45, 0.9])
    dip = gp.largest_dip(table)
    assert (dip["from_layer"], dip["to_layer"], dip["searched"]) == (1, 2, 3)
    assert dip["drops"].tolist() == pytest.approx([0.3])  # class 1 has no layer-2 value
    assert_close(gp.curve_distance([0.5, 0.5, 0.5], [0.5, 0.5]), 0.0)
    assert_close(gp.curve_distance([0.3, 0.6, 0.4, 0.7], [0.4, 0.7, 0.5, 0.8]), 0.1)
    assert_close(gp.curve_distance([0.0, 1.0], [0.0, 0.0, 0.0], grid=3), 0.5)  # depths 0, 0.5, 1: |0|, |0.5|, |1|
    with pytest.raises(ValueError, match="at least two gate locations"):
        gp.largest_dip(table[[0]])


@pytest.mark.parametrize("arch", ["resnet18", "vgg16_bn"])
def test_search_copy_of_a_backbone_folds_every_batchnorm_and_computes_the_same_function(arch):
    torch.manual_seed(0)
    model = build_backbone(arch, 5, small_input=True, width=0.125).eval()
    copy_, memory_format = gp.search_copy(model, gp.gate_locations(model, (3, 32, 32)))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in copy_.modules())
    assert memory_format == torch.channels_last
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = copy_(x.contiguous(memory_format=memory_format))
    assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_search_copy_keeps_a_batchnorm_at_a_gate_location_and_then_stays_contiguous():
    model, locations, _ = tiny_setup()
    at_bn = [gp.GateLocation("features.1", 4, 8, 8)] + locations[1:]
    copy_, memory_format = gp.search_copy(model, at_bn)
    assert isinstance(copy_.features[1], nn.BatchNorm2d) and memory_format == torch.contiguous_format
    folded, memory_format = gp.search_copy(model, locations)
    assert isinstance(folded.features[1], nn.Identity) and memory_format == torch.channels_last


# ---------------------------------------------------------------------------- notebook 05's steps
def test_class_groups_of_a_concept_world_follow_its_rules(tiny_world):
    dataset = ClassificationDataset(tiny_world, "train")
    classes = list(range(len(dataset.classes)))[1:5]
    groups = gp.class_groups(dataset, classes)
    rules = {rule.name: rule for rule in cw.CLASS_RULES}  # the catalogue the world was written from
    assert groups.classes == classes and groups.names == [dataset.classes[c] for c in classes]
    assert groups.scene == [rules[name].scene for name in groups.names]
    assert groups.superclass == [dataset.superclasses.index(rules[name].superclass) for name in groups.names]
    assert {c: sorted(v) for c, v in groups.concepts.items()} == {
        c: sorted(rules[dataset.classes[c]].as_dict().values()) for c in classes}


def test_class_groups_of_an_image_folder_are_the_classes_themselves(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / name / "a.png")
    groups = gp.class_groups(ClassificationDataset(tmp_path, "train"), [1, 0])
    assert groups == gp.ClassGroups(classes=[1, 0], names=["dog", "cat"], superclass=[1, 0], scene=["dog", "cat"],
                                    concepts={1: [], 0: []})


def test_class_order_is_superclass_then_scene_then_class_id():
    groups = gp.ClassGroups(classes=[5, 6, 7, 8], names=list("efgh"), superclass=[1, 0, 1, 0], scene=["b", "z", "a", "a"],
                            concepts={})
    assert groups.order() == [3, 1, 2, 0]  # (0, a, 8), (0, z, 6), (1, a, 7), (1, b, 5)


FOUR_CLASS_GROUPS = gp.ClassGroups(classes=[0, 1, 2, 3], names=list("abcd"), superclass=[0, 0, 1, 1],
                                   scene=["a", "b", "c", "c"], concepts={})


def test_similarity_by_group_hand_values():
    similarity = torch.tensor([[1.0, 0.8, 0.2, 0.1], [0.8, 1.0, 0.3, 0.2], [0.2, 0.3, 1.0, 0.6], [0.1, 0.2, 0.6, 1.0]])
    table = gp.similarity_by_group({"net": SimpleNamespace(similarity=similarity)}, FOUR_CLASS_GROUPS)
    assert table[["network", "grouping", "n_within_pairs", "n_between_pairs"]].values.tolist() == [
        ["net", "superclass", 2, 4], ["net", "scene", 1, 5]]
    assert_close(table["within"].tolist(), [0.7, 0.6], atol=1e-6)  # (0.8 + 0.6) / 2; 0.6
    assert_close(table["between"].tolist(), [0.2, 0.32], atol=1e-6)  # (.2 + .1 + .3 + .2) / 4; (.8 + .2 + .1 + .3 + .2) / 5


def test_misclassification_table_hand_values():
    wrong = pd.DataFrame({"true": [0, 0, 2], "predicted": [1, 2, 3], "rank": [0.5, 1.0, 0.0]})
    none = pd.DataFrame({"true": [], "predicted": [], "rank": []})
    table = gp.misclassification_table({"a": SimpleNamespace(misclassification=wrong),
                                        "b": SimpleNamespace(misclassification=none)}, FOUR_CLASS_GROUPS)
    first, second = table.to_dict("records")
    # true class 0: mean(0.5, 1.0) = 0.75; true class 2: 0.0 -> over classes mean 0.375, SE 0.75 / 2
    assert first["network"] == "a" and first["misclassified"] == 3 and first["true_classes"] == 2
    assert first["mean_rank"] == 0.375 and first["se_over_classes"] == pytest.approx(0.375)
    assert first["same_superclass"] == pytest.approx(2 / 3)  # (0, 1) and (2, 3) share one, (0, 2) does not
    assert second["misclassified"] == 0 and all(math.isnan(second[k]) for k in ("mean_rank", "se_over_classes",
                                                                                  "same_superclass"))


def test_dissected_locations_are_the_last_ones():
    locations = [gp.GateLocation(name=f"l{i}", channels=1, height=1, width=1) for i in range(3)]
    assert gp.NADSettings(dissect_layers=2).dissected_locations(locations) == locations[1:]
    assert gp.NADSettings(dissect_layers=5).dissected_locations(locations) == locations
    assert gp.NADSettings().dissected_locations(locations) == locations
    with pytest.raises(ValueError, match="dissect_layers = 0: give at least 1"):
        gp.NADSettings(dissect_layers=0)


def test_search_needs_beta():
    model = nn.Sequential(nn.Conv2d(3, 2, 1)).eval()
    with pytest.raises(ValueError, match="PathSearchConfig.beta is not set"):
        gp.search_paths(model, [], {0: torch.zeros(1, 3, 4, 4)}, config=gp.PathSearchConfig())


def test_prepare_network_applies_the_arch_overrides_and_the_seed(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path))
    settings = gp.NADSettings(archs=("alexnet",), model_overrides={"alexnet": {"width": 0.125}},
                              train_overrides={"alexnet": {"epochs": 2}})
    base_model = BackboneConfig(arch="resnet18", small_input=True, width=0.5)
    base_train = TrainConfig(epochs=1, batch_size=8, lr=0.01)
    model, key, history = gp.prepare_network(settings, "alexnet", tiny_world, model_config=base_model,
                                             train_config=base_train, seed=4, device="cpu")
    assert key == {"model": BackboneConfig(arch="alexnet", small_input=True, width=0.125),
                   "data": ClassificationDataset(tiny_world, "train").fingerprint,
                   "train": TrainConfig(epochs=2, batch_size=8, lr=0.01, seed=4)}
    assert len(history) == 2 and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_random_paths_keep_sizes_and_stability_by_hand():
    paths = [torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool), torch.tensor([[1, 0], [0, 0]], dtype=torch.bool)]
    drawn = gp.random_paths_like(paths, torch.Generator().manual_seed(0))
    assert all(torch.equal(d.sum(1), p.sum(1)) for d, p in zip(drawn, paths))
    locations = [gp.GateLocation("a", 4, 1, 1, False), gp.GateLocation("b", 2, 1, 1, False)]
    first = gp.PathSet([0, 1], locations, [p.float() * 2 - 1 for p in paths], {})
    other = [torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool), torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)]
    second = gp.PathSet([0, 1], locations, [p.float() * 2 - 1 for p in other], {})
    table = gp.path_stability([first, second, first])
    # pairs (1,2), (1,3), (2,3): class 0 IoU per layer (1/3, 1), (1, 1), (1/3, 1); class 1 (1, 0), (1, 1), (1, 0)
    assert table["stability"].tolist() == pytest.approx([(2 / 3 + 1 + 2 / 3) / 3, (0.5 + 1 + 0.5) / 3])
    assert ((table["random"] > 0) & (table["random"] <= 1)).all()
    with pytest.raises(ValueError, match="at least two searches"):
        gp.path_stability([first])
    diversity = gp.random_path_diversity([torch.ones(3, 4, dtype=torch.bool)], n_random=3)
    assert diversity.tolist() == [0.0, 0.0, 0.0]  # full paths: every pair identical whatever the draw


def test_hit_map_resize_is_pils_bicubic():
    """The quantised path resizes exactly as PIL's bicubic does (the official `cam_2x2.py`)."""
    maps = torch.tensor([[[0.0, 3.0, 1.0], [2.0, 9.0, 4.0], [1.0, 0.5, 7.0]]])
    mask = gp.top_fraction_mask(maps, 12, top_fraction=0.1)
    quantised = np.uint8(np.floor(maps[0].numpy() / 9.0 * 255))
    resized = np.asarray(Image.fromarray(quantised, mode="L").resize((12, 12), Image.BICUBIC)).astype(float)
    threshold = np.sort(resized.ravel())[::-1][math.floor(0.1 * 144) - 1]
    assert torch.equal(mask[0], torch.from_numpy(resized > threshold))


def test_beta_check_picks_the_smallest_sparse_beta(tmp_path, monkeypatch):
    """Short cached searches per grid value; the smallest beta whose paths keep at most the allowed
    share wins; an arch with an explicit beta is left alone; the searches are cached."""
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path))
    model, locations, class_images = tiny_setup()
    network = gp.Network(model, "tiny", 0, {"model": "tiny"}, None, locations)
    images = SimpleNamespace(train=class_images, val=class_images)
    settings = gp.NADSettings(archs=("tiny",), beta={}, beta_grid=(0.01, 50.0, 5.0), beta_classes=(0, 1),
                              beta_epochs=3, beta_max_kept=0.45, search=gp.PathSearchConfig(batch_size=4))
    with pytest.raises(ValueError, match="no beta known"):
        settings.search_config("tiny")
    chosen, table = gp.calibrate_betas({"tiny_s0": network}, images, settings, device="cpu")
    assert table["beta"].tolist() == [0.01, 5.0, 50.0] and table["classes"].eq(2).all()
    kept = dict(zip(table["beta"], table["units_kept"]))
    assert kept[0.01] > 0.45 >= kept[50.0], "the grid must straddle the limit for this test to mean anything"
    expected = min(b for b, k in kept.items() if k <= 0.45)
    assert chosen.search_config("tiny").beta == expected and table.loc[table["chosen"], "beta"].tolist() == [expected]
    assert len(list(tmp_path.glob("nad_paths/*/DONE.json"))) == 3
    explicit = dataclasses.replace(settings, beta={"tiny": 1.0})
    unchanged, empty = gp.calibrate_betas({"tiny_s0": network}, images, explicit, device="cpu")
    assert unchanged.search_config("tiny").beta == 1.0 and empty.empty


def test_cached_search_stages_continue_from_the_highest_cached_cap(tmp_path, monkeypatch):
    """With epoch stages, a search with a higher cap starts from the cached lower-cap search (no fresh
    search runs) and equals a search run with that cap at once; each stage is cached."""
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path))
    model, locations, class_images = tiny_setup()
    config = gp.PathSearchConfig(beta=0.5, epochs=12, batch_size=4, stop_flip_rate=0.05, stop_patience=2, min_epochs=3)
    classes = list(class_images)

    def cached(epochs: int, stages=()):
        return gp.search_paths_cached(model, locations, class_images, classes, key={"model": "tiny"}, device="cpu",
                                      config=dataclasses.replace(config, epochs=epochs), epoch_stages=stages)

    cached(5)
    monkeypatch.setattr(nad_experiment, "search_paths", lambda *a, **k: pytest.fail("the cached stage was not used"))
    staged = cached(12, stages=(5, 8))
    assert len(list(tmp_path.glob("nad_paths/*/DONE.json"))) == 3  # caps 5, 8 and 12
    fresh = gp.search_paths(model, locations, class_images, classes, config=config, device="cpu")
    for a, b in zip(fresh.logits, staged.logits):
        assert_close(b, a, atol=1e-5)
    monkeypatch.setattr(nad_experiment, "extend_search", lambda *a, **k: pytest.fail("the final cap is cached"))
    again = cached(12, stages=(5, 8))
    assert all(torch.equal(a, b) for a, b in zip(again.logits, staged.logits))


def test_networks_per_arch_are_trained_with_each_archs_recipe(tiny_world, tmp_path, monkeypatch):
    """Two seeds of one arch, one of another: names <arch>_s<seed>; each arch's recipe is notebook 00's
    choice for it (here one candidate per search), then its train_overrides; too few seeds is an error."""
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path))
    settings = gp.NADSettings(archs=("alexnet", "resnet18"), networks_per_arch=2, networks_of={"resnet18": 1},
                              model_overrides={"alexnet": {"width": 0.125}}, train_overrides={"resnet18": {"epochs": 2}})
    search = RecipeSearch(candidates={"only": {"epochs": 1, "lr": 0.02}})
    recipes = gp.training_recipes(settings, tiny_world, model_config=BackboneConfig(arch="resnet18", small_input=True, width=0.125),
                                  train_config=TrainConfig(epochs=3, batch_size=8, lr=0.01), search=search, device="cpu")
    assert (recipes["alexnet"].epochs, recipes["alexnet"].lr) == (1, 0.02)
    assert (recipes["resnet18"].epochs, recipes["resnet18"].lr) == (2, 0.02)
    plain = gp.training_recipes(settings, tiny_world, model_config=BackboneConfig(arch="resnet18"),
                                train_config=TrainConfig(epochs=3, batch_size=8, lr=0.01), search=None)
    assert plain["alexnet"].epochs == 3 and plain["resnet18"].epochs == 2
    networks = gp.prepare_networks(settings, tiny_world, (3, 32, 32),
                                   model_config=BackboneConfig(arch="resnet18", small_input=True, width=0.125),
                                   recipes=recipes, seeds=[0, 5], device="cpu")
    assert list(networks) == ["alexnet_s0", "alexnet_s5", "resnet18_s0"]
    assert networks["alexnet_s5"].key["train"].seed == 5 and networks["resnet18_s0"].key["train"].epochs == 2
    table = gp.training_table(networks)
    assert table["epochs"].tolist() == [1, 1, 2] and table["network"].tolist() == list(networks)
    with pytest.raises(ValueError, match="asks for 2 networks of alexnet but \\[runtime\\] seeds lists 1"):
        settings.network_seeds("alexnet", [0])


def test_pathset_subset_keeps_rows_and_trace():
    model, locations, class_images = tiny_setup()
    paths = gp.search_paths(model, locations, class_images, config=gp.PathSearchConfig(beta=0.5, epochs=2, batch_size=4),
                            device="cpu")
    part = paths.subset([2, 0])
    assert part.classes == [2, 0] and set(part.trace["class_id"]) == {0, 2}
    assert all(torch.equal(p, torch.stack([full[2], full[0]])) for p, full in zip(part.logits, paths.logits))
    alone = gp.search_paths(model, locations, {c: class_images[c] for c in (2, 0)}, [2, 0],
                            config=gp.PathSearchConfig(beta=0.5, epochs=2, batch_size=4), device="cpu")
    for a, b in zip(alone.logits, part.logits):  # per-class seeding: a class's path ignores its company
        assert_close(a, b, atol=1e-5)

"""Several layers in one pass: hand-set model with known activations, exact equality with single-layer runs."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from replication.analysis.dissection import Dissection, DissectionConfig, dissect
from replication.analysis.features import dissect_layers, feature_shapes, layer_features, layer_groups
from replication.data.broden import BrodenDataset
from replication.data.subsets import AttributeSubset, InMemoryItems
from replication.models.hooks import capture_activations
from tests.broden_fixture import write_tiny_broden
from tests.helpers import assert_close

N_IMAGES, IMAGE_SIZE, BATCH = 10, 32, 3
BATCHES = -(-N_IMAGES // BATCH)


class KnownStages(nn.Module):
    """brightness = R + G + B; split = (brightness, 0.5 − brightness); relu in place; 2×2 max pool; a head
    that counts its calls (it must not run when only earlier layers are read)."""

    def __init__(self):
        super().__init__()
        self.brightness = nn.Conv2d(3, 1, 1, bias=False)
        self.split = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU(inplace=True)  # overwrites split's output: captures must be copies
        self.pool = nn.MaxPool2d(2)
        self.head_calls = 0
        with torch.no_grad():
            self.brightness.weight.fill_(1.0)
            self.split.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.split.bias.copy_(torch.tensor([0.0, 0.5]))

    def forward(self, x):
        pooled = self.pool(self.relu(self.split(self.brightness(x))))
        self.head_calls += 1
        return pooled.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = write_tiny_broden(tmp_path_factory.mktemp("broden"), n_images=N_IMAGES, image_size=IMAGE_SIZE).root
    return InMemoryItems(BrodenDataset(root))


def images_of(dataset) -> torch.Tensor:
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def forward_calls(model: nn.Module) -> list[int]:
    """A counter of forward passes that reach the model's first layer."""
    calls = [0]
    model.brightness.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def assert_same_dissection(got: Dissection, expected: Dissection) -> None:
    pd.testing.assert_frame_equal(got.units, expected.units, check_exact=True)
    pd.testing.assert_frame_equal(got.summary, expected.summary, check_exact=True)
    assert np.array_equal(got.thresholds, expected.thresholds)
    assert np.array_equal(got.iou, expected.iou, equal_nan=True)
    assert np.array_equal(got.image_max, expected.image_max)
    assert got.counts.keys() == expected.counts.keys()
    assert all(np.array_equal(got.counts[k], expected.counts[k]) for k in got.counts)
    assert got.config == expected.config and got.label_names == expected.label_names


# ---------------------------------------------------------------- features
def test_features_have_the_known_values(dataset):
    images = images_of(dataset)
    features = layer_features(KnownStages(), ["brightness", "pool"], dataset, batch_size=BATCH, device="cpu")
    brightness = images.sum(dim=1, keepdim=True)
    assert_close(features["brightness"], brightness, atol=1e-5)
    expected_pool = F.max_pool2d(torch.cat([brightness, 0.5 - brightness], dim=1).relu(), 2)
    assert_close(features["pool"], expected_pool, atol=1e-5)
    assert list(features) == ["brightness", "pool"] and features["pool"].dtype == torch.float32
    assert features["pool"].device.type == "cpu"


def test_several_layers_equal_single_layer_captures_exactly(dataset):
    model = KnownStages()
    layers = ["pool", "split", "brightness"]  # not in execution order
    together = layer_features(model, layers, dataset, batch_size=BATCH, device="cpu")
    assert list(together) == layers
    batches = [images_of(dataset)[start : start + BATCH] for start in range(0, N_IMAGES, BATCH)]
    for layer in layers:
        alone = layer_features(model, [layer], dataset, batch_size=BATCH, device="cpu")[layer]
        with torch.no_grad(), capture_activations(model, layer) as captured:  # a full forward, as the old copies did
            full = torch.cat([(model(batch), captured[layer])[1] for batch in batches])
        assert torch.equal(together[layer], alone), layer
        assert torch.equal(together[layer], full), layer
    # split's output is later overwritten by the in-place relu: the capture is the value before it
    assert (together["split"] < 0).any()


def test_the_forward_stops_after_the_last_requested_layer(dataset):
    model = KnownStages()
    calls = forward_calls(model)
    layer_features(model, ["split", "brightness"], dataset, batch_size=BATCH, device="cpu")
    shapes = feature_shapes(model, ["pool", "brightness"], dataset, device="cpu")
    assert model.head_calls == 0 and calls[0] == 1 + BATCHES + 1  # probe + batches, then the shape probe
    assert shapes == {"pool": (2, IMAGE_SIZE // 2, IMAGE_SIZE // 2), "brightness": (1, IMAGE_SIZE, IMAGE_SIZE)}
    assert hook_count(model) == 1  # only the test's own counter


@pytest.mark.parametrize("device", ["auto", "cpu", None])
def test_feature_shapes_accept_every_device_spelling(dataset, device):
    assert feature_shapes(KnownStages(), ["split"], dataset, device=device) == {"split": (2, IMAGE_SIZE, IMAGE_SIZE)}


def test_layer_groups_fill_each_group_up_to_the_budget():
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1, "e": 3, "f": 8}
    assert layer_groups(sizes, 8) == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    assert layer_groups(sizes, 100) == [list(sizes)]
    assert layer_groups(sizes, 1) == [[name] for name in sizes]  # too large alone: a group of one
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        layer_groups(sizes, 0)


# ---------------------------------------------------------------- dissection
CONFIG = DissectionConfig(batch_size=BATCH, quantile=0.05, iou_threshold=0.04)
SETTINGS = dict(**CONFIG.dissect_keywords(), device="cpu")  # the same settings as keywords of `dissect`
LAYERS = ["relu", "brightness", "pool", "split"]


def test_dissect_layers_equals_per_layer_dissect_exactly(dataset):
    model = KnownStages()
    # the fixture's flat fills tie at the 0.05 thresholds and tied positions stay off (Lite's '>'):
    # at 0.2 the default options find detectors, so the comparison covers them, not only empty tables
    config = replace(CONFIG, quantile=0.2)
    results = dissect_layers(model, LAYERS, dataset, config=config, device="cpu")
    assert list(results) == LAYERS
    for layer in LAYERS:
        assert_same_dissection(results[layer], dissect(model, layer, dataset, **{**SETTINGS, "quantile": 0.2}))
    assert results["pool"].units["detector"].any()
    options = dict(categories=["color", "object"], upsample="nearest", denominator="union", mask_comparison=">=",
                   antialias=False)
    chosen = dissect_layers(model, ["pool", "brightness"], dataset, config=CONFIG, device="cpu", **options)
    for layer in ("pool", "brightness"):
        assert_same_dissection(chosen[layer], dissect(model, layer, dataset, **SETTINGS, **options))
    assert chosen["pool"].units["detector"].any()


def test_dissect_layers_takes_quantile_and_threshold_from_the_config(dataset):
    assert CONFIG.dissect_keywords() == {"quantile": 0.05, "iou_threshold": 0.04, "batch_size": BATCH}
    config = DissectionConfig(batch_size=BATCH, split=None, quantile=0.1, iou_threshold=0.2)
    recorded = dissect_layers(KnownStages(), ["pool"], dataset, config=config, device="cpu")["pool"].config
    assert (recorded["quantile"], recorded["iou_threshold"]) == (0.1, 0.2)


def per_layer_bytes(shape: tuple[int, ...]) -> int:
    return N_IMAGES * int(np.prod(shape)) * 4


@pytest.mark.parametrize("budget, passes", [
    ("all", 1),  # one pass for every layer
    ("largest", 3),  # relu + brightness exceed it: (relu), (brightness, pool), (split)
    ("none", 4),  # each layer alone exceeds it: each streamed by `dissect`
])
def test_grouped_passes_under_a_tiny_budget_equal_one_pass(dataset, budget, passes):
    model = KnownStages()
    largest = per_layer_bytes((2, IMAGE_SIZE, IMAGE_SIZE))
    max_bytes = {"all": 4 * largest, "largest": largest, "none": 1}[budget]
    reference = dissect_layers(model, LAYERS, dataset, config=CONFIG, device="cpu", max_bytes=4 * largest)
    calls = forward_calls(model)
    grouped = dissect_layers(model, LAYERS, dataset, config=CONFIG, device="cpu", max_bytes=max_bytes)
    assert calls[0] == 1 + passes * BATCHES  # the shape probe, then one pass per group
    assert list(grouped) == LAYERS
    for layer in LAYERS:
        assert_same_dissection(grouped[layer], reference[layer])


def test_grouped_features_equal_one_pass(dataset):
    model = KnownStages()
    whole = layer_features(model, LAYERS, dataset, batch_size=BATCH, device="cpu")
    sizes = {layer: per_layer_bytes(tuple(whole[layer].shape[1:])) for layer in LAYERS}
    for group in layer_groups(sizes, per_layer_bytes((2, IMAGE_SIZE, IMAGE_SIZE))):
        part = layer_features(model, group, dataset, batch_size=BATCH, device="cpu", max_bytes=sum(sizes[g] for g in group))
        assert all(torch.equal(part[layer], whole[layer]) for layer in group)


def test_training_flags_are_restored_also_after_errors(dataset):
    model = KnownStages().train()
    model.split.eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    layer_features(model, ["pool"], dataset, batch_size=BATCH, device="cpu")
    dissect_layers(model, ["split", "pool"], dataset, config=CONFIG, device="cpu", max_bytes=1)
    feature_shapes(model, ["relu"], dataset, device="cpu")
    with pytest.raises(ValueError, match="unknown layer"):
        dissect_layers(model, ["pool", "nope"], dataset, config=CONFIG, device="cpu")
    assert [m.training for m in model.modules()] == flags and hook_count(model) == 0


# ---------------------------------------------------------------- bad input
def test_bad_input_fails_with_clear_messages_before_any_pass(dataset):
    model = KnownStages()
    calls = forward_calls(model)
    empty = AttributeSubset(dataset.dataset, [])
    cases = [
        (lambda: layer_features(model, ["pool", "nope"], dataset, batch_size=BATCH, device="cpu"), "unknown layer 'nope'"),
        (lambda: dissect_layers(model, ["nope"], dataset, config=CONFIG, device="cpu"), "unknown layer 'nope'"),
        (lambda: layer_features(model, ["pool"], dataset, batch_size=0, device="cpu"), "batch_size must be at least 1; got 0"),
        (lambda: dissect_layers(model, ["pool"], dataset, config=replace(CONFIG, batch_size=0), device="cpu"), "batch_size must be at least 1"),
        (lambda: layer_features(model, ["pool"], empty, batch_size=BATCH, device="cpu"), "the dataset is empty"),
        (lambda: dissect_layers(model, ["pool"], empty, config=CONFIG, device="cpu"), "the dataset is empty"),
        (lambda: feature_shapes(model, ["pool"], empty, device="cpu"), "the dataset is empty"),
        (lambda: layer_features(model, [], dataset, batch_size=BATCH, device="cpu"), "no layers given"),
        (lambda: dissect_layers(model, ["pool", "relu", "pool"], dataset, config=CONFIG, device="cpu"), r"\['pool'\] are listed more than once"),
        (lambda: dissect_layers(model, ["pool"], dataset, config=CONFIG, device="cpu", treshold=0.1), r"unknown dissection option\(s\) \['treshold'\]"),
        (lambda: dissect_layers(model, ["pool"], dataset, config=CONFIG, device="cpu", categories=["smell"]), r"categories \['smell'\] are not in"),
        (lambda: dissect_layers(model, ["pool"], dataset, config=replace(CONFIG, quantile=2.0), device="cpu"), "quantile must lie in"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert calls[0] == 0 and model.head_calls == 0
    too_big = per_layer_bytes((2, IMAGE_SIZE // 2, IMAGE_SIZE // 2)) - 1
    with pytest.raises(ValueError, match=r"need 20,480 bytes, more than max_bytes=20,479"):
        layer_features(model, ["pool"], dataset, batch_size=BATCH, device="cpu", max_bytes=too_big)
    assert calls[0] == 1  # only the shape probe ran


def test_layers_without_maps_cannot_be_dissected(dataset):
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten())
    with pytest.raises(ValueError, match=r"layers \['1'\] give outputs of per-image shape \[\(2048,\)\]"):
        dissect_layers(model, ["0", "1"], dataset, config=CONFIG, device="cpu")
    assert layer_features(model, ["1"], dataset, batch_size=BATCH, device="cpu")["1"].shape == (N_IMAGES, 2048)


def test_a_layer_the_forward_never_calls_is_an_error(dataset):
    model = KnownStages()
    model.unused = nn.Conv2d(2, 2, 1)
    with pytest.raises(ValueError, match=r"layers \['unused'\] did not run in the forward pass of KnownStages"):
        layer_features(model, ["pool", "unused"], dataset, batch_size=BATCH, device="cpu")
    assert hook_count(model) == 0 and model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_and_dissections_match_single_layer_runs(dataset):
    model = KnownStages()
    cuda = {**CONFIG.dissect_keywords(), "device": "cuda"}
    features = layer_features(model, LAYERS, dataset, batch_size=BATCH, device="cuda")
    on_cpu = layer_features(model, LAYERS, dataset, batch_size=BATCH, device="cpu")
    for layer in LAYERS:
        assert features[layer].device.type == "cpu"
        assert_close(features[layer], on_cpu[layer], atol=1e-5)
    results = dissect_layers(model, LAYERS, dataset, config=CONFIG, device="cuda", max_bytes=per_layer_bytes((2, IMAGE_SIZE, IMAGE_SIZE)))
    for layer in LAYERS:
        assert_same_dissection(results[layer], dissect(model, layer, dataset, **cuda))

"""Backbones: torchvision names and widths, small-input spatial sizes, no downloads, local weight loading."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import replication  # noqa: F401  (before torchvision)
import torchvision
from replication.models.anatomy import anatomy_of
from replication.models.backbones import ARCHS, BackboneConfig, build_backbone, load_weights
from replication.models.hooks import capture_activations, get_module

# torchvision's own builder for each arch (alexnet_bn has the same conv channels as alexnet)
REFERENCE = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "vgg16": torchvision.models.vgg16,
    "vgg16_bn": torchvision.models.vgg16_bn,
    "alexnet": torchvision.models.alexnet,
    "alexnet_bn": torchvision.models.alexnet,
    "densenet121": torchvision.models.densenet121,
}
SMALL_64PX_SIZE = {"resnet18": 8, "resnet50": 8, "vgg16": 8, "vgg16_bn": 8, "alexnet": 7, "alexnet_bn": 7, "densenet121": 8}


def conv_channels(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def small(arch: str, num_classes: int = 10) -> nn.Module:
    return build_backbone(arch, num_classes, small_input=True, width=0.25)


@pytest.mark.parametrize("arch", ARCHS)
def test_small_input_keeps_at_least_7x7_in_last_conv_stage_at_64px(arch):
    model = small(arch).eval()
    layer = anatomy_of(model).last_conv
    with torch.no_grad(), capture_activations(model, layer) as acts:
        logits = model(torch.randn(2, 3, 64, 64))
    size = SMALL_64PX_SIZE[arch]
    assert tuple(acts[layer].shape[2:]) == (size, size) and size >= 7
    assert tuple(logits.shape) == (2, 10)
    # the named layer is the last conv stage: it holds the network's last convolution
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    assert any(m is last_conv for m in get_module(model, layer).modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_width_scales_every_conv_and_keeps_torchvision_names(arch):
    with torch.device("meta"):  # reference structure only, no memory or init cost
        reference = REFERENCE[arch](weights=None, num_classes=10)
    quarter, half = small(arch), build_backbone(arch, 10, small_input=True, width=0.5)
    assert [4 * c for c in conv_channels(quarter)] == conv_channels(reference)
    assert [2 * c for c in conv_channels(quarter)] == conv_channels(half)
    if arch != "alexnet_bn":  # BN inserts modules: no torchvision counterpart to compare names with
        assert [n for n, _ in quarter.named_modules()] == [n for n, _ in reference.named_modules()]


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_keep_stem_pool_halves_every_stage_and_keeps_the_cache_key_of_configs_without_it(arch):
    from replication.cache import config_hash

    model = build_backbone(arch, 10, small_input=True, width=0.25, keep_stem_pool=True).eval()
    layer = anatomy_of(model).last_conv
    with torch.no_grad(), capture_activations(model, layer) as acts:
        model(torch.randn(1, 3, 64, 64))
    assert tuple(acts[layer].shape[2:]) == (SMALL_64PX_SIZE[arch] // 2,) * 2
    assert [n for n, _ in model.named_modules()] == [n for n, _ in small(arch).named_modules()]
    plain = BackboneConfig(arch, small_input=True)
    assert config_hash(plain) == config_hash({"arch": arch, "small_input": True, "width": 1.0, "weights": None})
    assert config_hash(BackboneConfig(arch, small_input=True, keep_stem_pool=True)) != config_hash(plain)


def test_relus_are_not_inplace_so_hooks_see_pre_activations():
    model = small("alexnet").eval()
    with torch.no_grad(), capture_activations(model, "features.0") as acts:
        model(torch.randn(2, 3, 64, 64))
    assert (acts["features.0"] < 0).any()


def test_nothing_is_downloaded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backbone tried to fetch weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)
    calls = []

    def spy(name):
        def builder(**kwargs):
            calls.append((name, kwargs))
            return nn.Sequential(nn.ReLU())

        return builder

    for name in ("resnet18", "resnet50", "vgg16", "vgg16_bn", "alexnet", "densenet121"):
        monkeypatch.setattr(torchvision.models, name, spy(name))
    for arch in ARCHS:
        build_backbone(arch, 5)  # torchvision-builder path
        small(arch)  # custom path
    assert {name for name, _ in calls} == {"resnet18", "resnet50", "vgg16", "vgg16_bn", "alexnet", "densenet121"}
    assert all(kwargs == {"weights": None, "num_classes": 5} for _, kwargs in calls)


def test_bad_arguments_say_what_is_valid():
    with pytest.raises(ValueError, match="choose one of resnet18"):
        build_backbone("resnet34", 10)
    with pytest.raises(ValueError, match="width must be > 0"):
        build_backbone("resnet18", 10, width=0)
    with pytest.raises(ValueError, match="does not apply to arch 'vgg16'"):
        build_backbone("vgg16", 10, small_input=True, keep_stem_pool=True)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_torchvision_and_places365_checkpoints_load_by_name(tmp_path):
    torch.manual_seed(0)
    source = small("resnet18")
    bare = tmp_path / "bare.pth"
    torch.save(source.state_dict(), bare)
    assert_same_weights(load_weights(small("resnet18"), bare), source)

    # CSAIL Places365 layout: DataParallel prefixes inside a `state_dict` wrapper, written before BN
    # tracked its batch count
    places = tmp_path / "resnet18_places365.pth.tar"
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": wrapped, "best_prec1": 54.7}, places)
    assert_same_weights(load_weights(small("resnet18"), places), source)


def test_legacy_densenet_names_load(tmp_path):
    source = small("densenet121")
    legacy = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in source.state_dict().items()}
    assert any(".norm.1." in k for k in legacy)
    torch.save({"state_dict": legacy}, tmp_path / "densenet.pth")
    assert_same_weights(load_weights(small("densenet121"), tmp_path / "densenet.pth"), source)


def test_mismatched_weights_list_missing_unexpected_and_misshaped_keys(tmp_path):
    state = small("resnet18", num_classes=10).state_dict()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        load_weights(small("resnet18", num_classes=7), tmp_path / "bad.pth")
    message = str(error.value)
    assert "missing (1): fc.bias" in message
    assert "unexpected (1): extra.weight" in message
    assert "shape mismatch (1): fc.weight (10, 128) vs model (7, 128)" in message


def test_whole_model_pickles_are_refused_by_weights_only(tmp_path):
    torch.save(small("alexnet"), tmp_path / "whole.pth")
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_weights(small("alexnet"), tmp_path / "whole.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(small("alexnet"), tmp_path / "absent.pth")


def test_backbone_config_builds_and_loads(tmp_path):
    source = small("vgg16")
    torch.save(source.state_dict(), tmp_path / "vgg.pth")
    config = BackboneConfig(arch="vgg16", small_input=True, width=0.25, weights=str(tmp_path / "vgg.pth"))
    assert_same_weights(config.build(10), source)

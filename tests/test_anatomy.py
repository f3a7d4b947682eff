"""Named layers per architecture: exact names for every backbone, read from the module tree, and the
profiles' layer lists checked against them."""
import pytest
import timm
import torch
from torch import nn

import replication  # noqa: F401  (before torchvision and timm)
import torchvision
from replication.models.anatomy import (
    FAMILY_OF_ARCH,
    FAMILY_OF_PRETRAINED,
    anatomy_of,
    batchnorm_pairs,
    connection_family,
    conv_layers,
    producing_conv,
)
from replication.models.backbones import ARCHS, build_backbone
from replication.models.pretrained import PRETRAINED, pretrained
from replication.profiles import available_profiles, load_profile

RESNET18_CONVS = ["conv1"] + [
    f"layer{stage}.{block}.{conv}"
    for stage in (1, 2, 3, 4) for block in (0, 1)
    for conv in (("conv1", "conv2", "downsample.0") if stage > 1 and block == 0 else ("conv1", "conv2"))
]
VGG16_NAMES = [f"conv{block}_{k}" for block, n in zip(range(1, 6), (2, 2, 3, 3, 3)) for k in range(1, n + 1)]


def small(arch: str) -> nn.Module:
    return build_backbone(arch, 3, small_input=True, width=0.125)


def test_resnet18_anatomy_is_exactly_torchvisions_layers():
    body = anatomy_of(torchvision.models.resnet18(weights=None))
    assert body.family == "residual"
    assert list(body.convs) == list(body.convs.values()) == RESNET18_CONVS
    expected_bns = {conv: conv.replace("conv", "bn").replace("downsample.0", "downsample.1") for conv in RESNET18_CONVS}
    assert body.batchnorms == expected_bns
    assert body.stem == "maxpool"
    assert body.blocks == tuple(f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1))
    assert body.stages == ("layer1", "layer2", "layer3", "layer4")
    assert body.features == body.last_conv == "layer4"
    assert body.pool == "avgpool"


@pytest.mark.parametrize("small_input", [False, True])
def test_vgg16_convs_by_the_papers_names_also_when_the_first_pool_is_removed(small_input):
    plain = build_backbone("vgg16", 3, small_input=small_input, width=0.125)
    body = anatomy_of(plain)
    assert list(body.convs) == VGG16_NAMES
    assert list(body.convs.values()) == [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
    assert body.conv("conv5_3") == body.last_conv == "features.28"
    assert body.batchnorms == {} and body.stem is None and body.blocks == body.stages == ()
    assert body.features == "features.30"  # pool5
    assert body.pool == "avgpool"
    with pytest.raises(ValueError, match="no conv called 'conv6_1'.*conv1_1, conv1_2"):
        body.conv("conv6_1")


def test_vgg16_bn_pairs_each_conv_with_the_batchnorm_after_it():
    body = anatomy_of(small("vgg16_bn"))
    assert list(body.convs) == VGG16_NAMES
    convs = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
    assert list(body.convs.values()) == [f"features.{i}" for i in convs]
    assert body.batchnorms == {f"features.{i}": f"features.{i + 1}" for i in convs}
    assert body.last_conv == "features.40" and body.features == "features.43"


@pytest.mark.parametrize("arch, convs", [("alexnet", (0, 3, 6, 8, 10)), ("alexnet_bn", (0, 4, 8, 11, 14))])
def test_alexnet_convs_are_numbered_conv1_to_conv5(arch, convs):
    body = anatomy_of(small(arch))
    assert body.convs == {f"conv{k + 1}": f"features.{i}" for k, i in enumerate(convs)}
    assert body.batchnorms == ({f"features.{i}": f"features.{i + 1}" for i in convs} if arch.endswith("_bn") else {})
    assert body.last_conv == f"features.{convs[-1]}"


def test_densenet121_blocks_and_only_the_batchnorms_that_normalise_one_conv():
    model = small("densenet121")
    body = anatomy_of(model)
    assert body.family == "dense" and body.stem == "features.pool0"
    assert body.stages == tuple(f"features.denseblock{i}" for i in (1, 2, 3, 4))
    assert body.blocks == tuple(f"features.{kind}{i}" for i in (1, 2, 3) for kind in ("denseblock", "transition")
                                ) + ("features.denseblock4",)
    assert body.features == "features.norm5" and body.last_conv == "features.denseblock4"
    assert body.pool is None  # DenseNet's forward pools with a function
    assert list(body.convs) == conv_layers(model) and len(body.convs) == 120
    # conv0 -> norm0 and each dense layer's conv1 -> norm2; conv2 and the transition convs feed a
    # concatenation or a pool, and norm1 normalises a concatenation
    layers = [f"features.denseblock{b}.denselayer{i}" for b, n in zip((1, 2, 3, 4), (6, 12, 24, 16)) for i in range(1, n + 1)]
    assert body.batchnorms == {"features.conv0": "features.norm0", **{f"{l}.conv1": f"{l}.norm2" for l in layers}}


def test_timm_efficientnet_pairs_convs_with_their_batchnorm_act_modules_and_never_folds_them():
    with torch.device("meta"):  # names and graph only
        model = timm.create_model("efficientnet_b0", pretrained=False)
    body = anatomy_of(model)
    assert body.family == "nas" and body.stem == "bn1" and body.pool == "global_pool"
    assert body.features == body.last_conv == "bn2"
    assert len(body.stages) == 7 and len(body.blocks) == 16
    # every block's squeeze-excitation holds two convs with a bias and no BatchNorm: read from the graph,
    # they pair with nothing
    unpaired = set(body.convs) - set(body.batchnorms)
    assert unpaired == {f"{block}.se.{conv}" for block in body.blocks for conv in ("conv_reduce", "conv_expand")}
    assert body.batchnorms["blocks.1.0.conv_pwl"] == "blocks.1.0.bn3" and body.batchnorms["conv_head"] == "bn2"
    # BatchNormAct2d also applies the activation: folding it into the conv would drop that
    assert batchnorm_pairs(model) == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_backbone_has_its_recorded_family(arch):
    assert connection_family(small(arch)) == FAMILY_OF_ARCH[arch]


def test_the_family_table_covers_exactly_the_backbones():
    assert set(FAMILY_OF_ARCH) == set(ARCHS)


@pytest.mark.parametrize("name", PRETRAINED)
def test_every_pretrained_network_has_its_recorded_family(name):
    with torch.device("meta"):  # the module tree only
        model = timm.create_model(PRETRAINED[name].timm_arch, pretrained=False)
    assert connection_family(model) == FAMILY_OF_PRETRAINED[name]
    assert set(FAMILY_OF_PRETRAINED) == set(PRETRAINED)


@pytest.mark.parametrize("profile", [name for name in available_profiles() if "baselines" in load_profile(name).sections])
def test_profile_baseline_layers_are_named_layers_of_their_arch(profile, paper_placeholders):  # paper's $VARs set
    baselines = load_profile(profile).section("baselines")
    assert set(baselines["rotation_layers"]) <= set(baselines["archs"])
    for arch, layers in baselines["layers"].items():
        body = anatomy_of(pretrained(arch) if arch in baselines.get("pretrained", ()) else small(arch))
        named = {*body.convs.values(), *body.blocks, *body.stages, body.features}
        assert set(layers) <= named, f"[baselines] layers.{arch} in {profile}: {sorted(set(layers) - named)} are unknown"


class Skip(nn.Module):
    """conv -> BN, but the conv's output is also added back: that BN cannot be folded into it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Conv2d(2, 2, 1)
        self.head_bn = nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.head_bn(self.head(self.bn(y) + y))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent control flow


def test_batchnorm_pairs_need_a_conv_output_read_by_the_batchnorm_alone():
    assert batchnorm_pairs(Skip()) == {"head": "head_bn"}
    with pytest.raises(ValueError, match="torch.fx cannot trace Untraceable"):
        batchnorm_pairs(Untraceable())


def test_producing_conv_is_the_conv_registered_before_a_layer():
    model = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1))
    assert producing_conv(model, "1") == "1"
    assert producing_conv(model, "2") == producing_conv(model, "3") == "1"
    assert producing_conv(model, "4") == "4"
    with pytest.raises(ValueError, match="no conv layer precedes '0'"):
        producing_conv(model, "0")
    with pytest.raises(ValueError, match="unknown layer '9'"):
        producing_conv(model, "9")
    assert conv_layers(model) == ["1", "4"]


def test_a_model_of_no_known_family_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot read the layers of Linear: expected a torchvision VGG/AlexNet"):
        anatomy_of(nn.Linear(2, 2))


def test_any_torchvision_vgg_is_named_by_its_blocks():
    with torch.device("meta"):  # names come from the module tree alone: no memory for the weights
        vgg11 = torchvision.models.vgg11(weights=None)
    assert list(anatomy_of(vgg11).convs) == ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "conv4_1", "conv4_2",
                                             "conv5_1", "conv5_2"]

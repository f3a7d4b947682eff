"""Model transforms and mode switches: exact restoration of what they change, exact BatchNorm folding."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import replication  # noqa: F401  (before torchvision)
from replication.models.backbones import build_backbone
from replication.models.surgery import eval_mode, fold_batchnorm, frozen, replace_module
from tests.helpers import assert_close


def test_eval_mode_restores_every_modules_own_flag_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_frozen_is_eval_mode_without_gradients_and_restores_both_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    model[1].weight.requires_grad_(False)  # a mixed state must come back as it was
    with pytest.raises(RuntimeError):
        with frozen(model):
            assert not any(m.training for m in model.modules())
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("inside")
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, True]
    assert all(m.training for m in model.modules())


def test_replace_module_by_dotted_name_returns_the_old_one():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)))
    pool = model[1][1]
    new = nn.AvgPool2d(2)
    assert replace_module(model, "1.1", new) is pool
    assert model[1][1] is new
    with pytest.raises(ValueError, match=r"unknown layer '1\.2'; valid layers: 0, 1, 1\.0, 1\.1"):
        replace_module(model, "1.2", nn.Identity())


def hand_set_pair(affine: bool = True) -> nn.Sequential:
    """1x1 conv (weight 2, no bias) -> BN (mean 1, var 3, eps 1, gamma 3, beta 0.5): y = 3x - 1."""
    conv, bn = nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1, eps=1.0, affine=affine)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(3.0)
        if affine:
            bn.weight.fill_(3.0)
            bn.bias.fill_(0.5)
    return nn.Sequential(conv, bn).eval()


@pytest.mark.parametrize("affine, weight, bias", [(True, 3.0, -1.0), (False, 1.0, -0.5)])
def test_fold_batchnorm_gives_the_hand_computed_conv(affine, weight, bias):
    model = hand_set_pair(affine)
    folded = fold_batchnorm(model)
    assert isinstance(folded[1], nn.Identity) and isinstance(model[1], nn.BatchNorm2d)  # the original is untouched
    assert folded[0].weight.item() == weight and folded[0].bias.item() == bias
    x = torch.tensor([-1.0, 0.0, 2.0]).view(3, 1, 1, 1)
    assert torch.equal(folded(x), weight * x + bias)
    assert torch.equal(model(x), folded(x))


def test_fold_batchnorm_leaves_kept_modules_and_untraceable_models_alone():
    model = hand_set_pair()
    assert isinstance(fold_batchnorm(model, keep={"1"})[1], nn.BatchNorm2d)
    assert isinstance(fold_batchnorm(model, keep={"0"})[1], nn.BatchNorm2d)

    class Branching(nn.Sequential):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x  # data-dependent: torch.fx cannot trace it

    untraceable = Branching(*hand_set_pair())
    assert isinstance(fold_batchnorm(untraceable)[1], nn.BatchNorm2d)


@pytest.mark.parametrize("arch, folded_all", [("resnet18", True), ("vgg16_bn", True), ("densenet121", False)])
def test_folded_backbone_gives_the_same_logits_on_random_batchnorm_statistics(arch, folded_all):
    torch.manual_seed(0)
    model = build_backbone(arch, 5, small_input=True, width=0.125).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong fold would show
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    folded = fold_batchnorm(model)
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert (left == 0) == folded_all
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > left  # the original is untouched
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = folded(x)
    assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))

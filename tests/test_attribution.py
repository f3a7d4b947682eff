"""explain(): captum's and zennit's explainers behind one call, checked on tiny hand-weighted models."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from replication.analysis.attribution import METHODS, explain

pytest.importorskip("captum")
pytest.importorskip("zennit")


class HandNet(nn.Module):
    """conv (2 hand-set filters) -> ReLU -> global average -> linear: Grad-CAM has a closed form here."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[2.0, -1.0], [-1.0, 3.0]]))

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def test_captum_gradcam_equals_a_gradcam_computed_by_hand():
    x = torch.tensor([[[[1.0, -2.0], [3.0, 0.5]]]])
    model = HandNet()
    ours = explain(model, x, "gradcam", target=torch.tensor([0]), layer="conv", device="cpu")
    # by hand: A = conv(x) (the hooked layer's output), dy0/dA_k = fc[0, k] * relu'(A_k) / 4; weights = spatial means
    a = model.conv(x)[0].detach()
    grads = torch.tensor([2.0, -1.0]).view(2, 1, 1) * (a > 0).float() / 4
    weights = grads.mean((1, 2))
    expected = F.relu((weights.view(2, 1, 1) * a).sum(0))
    torch.testing.assert_close(ours[0], expected)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_one_map_per_image_at_the_image_size(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    options = {"gradcam": dict(layer="0"), "integrated_gradients": dict(steps=4)}.get(method, {})
    maps = explain(model, torch.randn(5, 3, 6, 6), method, batch_size=2, device="cpu", **options)
    assert maps.shape == (5, 6, 6) and torch.isfinite(maps).all() and maps.abs().sum() > 0


def test_lrp_epsilon_on_a_linear_model_is_input_times_weight():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, 1.0, 1.0]]))
    x = torch.tensor([[[[1.0, 2.0], [-1.0, 0.5]]]])
    # epsilon rule on the dense layer, relevance 1 on the target: R_i = x_i w_i / z (z = x . w, epsilon negligible)
    maps = explain(model, x, "lrp", target=torch.tensor([0]), composite="epsilon_plus", channel_reduce="sum", device="cpu")
    contributions = x.flatten() * model[1].weight[0].detach()
    torch.testing.assert_close(maps[0].flatten(), contributions / contributions.sum(), rtol=1e-4, atol=1e-4)


def test_unknown_method_and_a_callable_method():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="unknown explainer"):
        explain(model, torch.zeros(1, 3, 2, 2), "occlusion")
    maps = explain(model, torch.zeros(2, 3, 2, 2), lambda m, x, t: x[:, 0] + t.view(-1, 1, 1), device="cpu")
    assert maps.shape == (2, 2, 2)


def test_misspelt_or_foreign_options_are_refused():
    model = HandNet()
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"integrated_gradients takes \['channel_reduce', 'steps'\], not \['n_steps'\]"):
        explain(model, x, "integrated_gradients", n_steps=64)
    with pytest.raises(ValueError, match=r"gradcam takes \['layer'\], not \['steps'\]"):
        explain(model, x, "gradcam", steps=4)
    with pytest.raises(ValueError, match="a callable method takes no options"):
        explain(model, x, lambda m, images, t: images[:, 0], layer="conv")


class CountingNet(HandNet):
    """HandNet that records the largest batch its forward pass sees."""

    largest = 0

    def forward(self, x):
        CountingNet.largest = max(CountingNet.largest, len(x))
        return super().forward(x)


def test_integrated_gradients_runs_at_most_batch_size_images_per_forward_pass():
    images = torch.randn(6, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 0, 1, 0, 1])
    model = CountingNet()
    small = explain(model, images, "integrated_gradients", target=target, steps=8, batch_size=4, device="cpu")
    assert CountingNet.largest == 4  # not 4 images × 8 steps
    large = explain(model, images, "integrated_gradients", target=target, steps=8, batch_size=64, device="cpu")
    assert CountingNet.largest == 6 * 8
    torch.testing.assert_close(small, large)


def _pooled(pool):
    """conv3×3 (seeded) -> ReLU -> `pool` -> flatten -> linear (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), pool, nn.Flatten(), nn.Linear(4, 3)).eval()


def test_lrp_through_a_uniform_lap_equals_lrp_through_the_average_pool():
    from replication.methods.attention_pooling.layer import LAP2d
    images = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    average = _pooled(nn.AdaptiveAvgPool2d(1))
    lap = _pooled(LAP2d(4, heads=2, head_mode="mean", alpha_init=5.0, reduction=2, init_std=0.0))  # uniform weights
    target = torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(lap(images), average(images))
    expected = explain(average, images, "lrp", target=target, channel_reduce="sum", device="cpu")
    got = explain(lap, images, "lrp", target=target, channel_reduce="sum", device="cpu")
    torch.testing.assert_close(got, expected)
    assert not lap[2].constant_weights  # the context is left


def test_lrp_through_lap_redistributes_by_its_window_weights_held_constant():
    from replication.methods.attention_pooling.layer import LAP2d
    # LAP on the input itself, each channel scored by itself (softmax weights depend on x), then a hand linear layer
    pool = LAP2d(3, heads=3, attention=nn.Identity(), weight_mode="softmax", alpha_init=2.0, flatten=True)
    model = nn.Sequential(pool, nn.Linear(3, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -0.5, 2.0], [0.5, 1.0, -1.0]]))
    x = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(2)) + 0.5
    maps = explain(model, x, "lrp", target=torch.tensor([0]), composite="epsilon_plus", channel_reduce="sum", device="cpu")
    # epsilon at the linear layer, R_c = W_0c Y_c / z; LAP's Norm rule with constant weights: R_cp = w_cp x_cp / Y_c R_c
    weights = torch.softmax(2.0 * x.flatten(2), -1)
    contributions = model[1].weight[0].detach().view(3, 1) * weights[0] * x.flatten(2)[0]
    torch.testing.assert_close(maps[0].flatten(), contributions.sum(0) / contributions.sum(), rtol=1e-4, atol=1e-5)


def test_guided_backprop_guides_relu6_as_it_guides_relu_and_refuses_other_activations():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 6, 6)  # below 6: ReLU6 and ReLU agree on the forward pass and its mask
    target = torch.tensor([0, 1])

    def net(activation):
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), activation, nn.Conv2d(4, 4, 3, padding=1), activation,
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    relu6_model = net(nn.ReLU6())
    with_relu6 = explain(relu6_model, images, "guided_backprop", target=target, device="cpu")
    with_relu = explain(net(nn.ReLU()), images, "guided_backprop", target=target, device="cpu")
    torch.testing.assert_close(with_relu6, with_relu)
    assert type(relu6_model[1]) is nn.ReLU6  # the swap is undone
    plain_gradient = explain(relu6_model, images, lambda m, x, t: _plain_gradient(m, x, t), target=target, device="cpu")
    assert not torch.allclose(with_relu6, plain_gradient)  # the rule acted (it was the plain gradient before)
    with pytest.raises(ValueError, match="SiLU"):
        explain(net(nn.SiLU()), images, "guided_backprop", target=target, device="cpu")


def _plain_gradient(model, images, target):
    x = images.clone().requires_grad_(True)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad.abs().sum(1)


def test_lrp_refuses_batchnorm_subclasses_zennit_cannot_merge():
    class NormAct(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), NormAct(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="NormAct"):
        explain(model, torch.rand(1, 3, 6, 6), "lrp", device="cpu")


def test_gamma_box_lrp_bounds_are_the_pixel_range_not_the_batchs():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    images, target = torch.randn(2, 3, 6, 6), torch.tensor([0, 1])
    images[1] *= 3.0  # a second image with a wider range: batch-wide bounds would change the first image's map
    together = explain(model, images, "lrp", target=target, composite="epsilon_gamma_box", device="cpu")
    alone = explain(model, images[:1], "lrp", target=target[:1], composite="epsilon_gamma_box", device="cpu")
    torch.testing.assert_close(together[:1], alone)

"""LAP (paper 02): the layer's limits, its insertion into every supported CNN, its maps and its losses."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from replication.methods.attention_pooling import layer as lap
from replication.methods.attention_pooling.losses import MaskInjectionLoss, WeakEvidenceLoss
from replication.models.backbones import ARCHS, build_backbone


def _self_scored(channels, alpha, **kwargs):
    """Every channel its own head, scored by itself: the max-pool limit is exactly max pooling."""
    return lap.LAP2d(channels, heads=channels, attention=nn.Identity(), alpha_init=alpha, **kwargs)


@pytest.mark.parametrize("kernel,stride,padding", [(None, None, 0), (2, 2, 0), (3, 2, 1)])
def test_lap_reduces_to_average_and_max_pooling_at_its_sharpness_limits(kernel, stride, padding):
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    window = {} if kernel is None else dict(kernel=kernel, stride=stride, padding=padding)
    flat = _self_scored(4, 1e-6, **window)(x)
    sharp = _self_scored(4, 1e7, **window)(x)
    if kernel is None:
        torch.testing.assert_close(flat, x.mean((2, 3), keepdim=True), rtol=0, atol=1e-5)
        torch.testing.assert_close(sharp, x.amax((2, 3), keepdim=True))
    else:
        # average over the window's real positions (zero padding weighs nothing), max as max pooling
        torch.testing.assert_close(flat, F.avg_pool2d(x, kernel, stride, padding, count_include_pad=False), rtol=0, atol=1e-5)
        torch.testing.assert_close(sharp, F.max_pool2d(x, kernel, stride, padding))


def test_tf_third_party_rule_matches_the_keras_formula():
    x = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    pool = lap.LAP2d(2, kernel=2, weight_mode="tf_third_party", alpha_init=0.7)
    windows = F.unfold(x, 2, stride=2).view(1, 2, 4, -1)
    top = windows.amax(2, keepdim=True)
    alpha = pool.alpha.detach()
    expected = (torch.exp(-alpha ** 2 * (top - windows) ** 2) * windows + lap.TF_EPS).mean(2).view(1, 2, 2, 2)
    torch.testing.assert_close(pool(x), expected)
    # its max-pool limit is scaled by 1/|R| (the weights are not normalised)
    sharp = lap.LAP2d(2, kernel=2, weight_mode="tf_third_party", alpha_init=1e4)(x)
    torch.testing.assert_close(sharp, F.max_pool2d(x, 2) / 4 + lap.TF_EPS)


def test_split_and_mean_heads_by_hand():
    x = torch.arange(2 * 4, dtype=torch.float32).view(1, 2, 2, 2)
    scores = torch.tensor([[[[5.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 5.0]]]])

    class Fixed(nn.Module):
        def forward(self, features):
            return scores

    split = lap.LAP2d(2, heads=2, attention=Fixed(), weight_mode="softmax", alpha_init=50.0)(x)
    torch.testing.assert_close(split.flatten(), torch.tensor([0.0, 7.0]), atol=1e-4, rtol=0)  # head 0 -> channel 0
    mean = lap.LAP2d(2, heads=2, head_mode="mean", attention=Fixed(), weight_mode="softmax", alpha_init=50.0)(x)
    torch.testing.assert_close(mean.flatten(), torch.tensor([1.5, 5.5]), atol=1e-4, rtol=0)  # half weight on each corner


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="weight_mode"):
        lap.LAP2d(4, weight_mode="max")
    with pytest.raises(ValueError, match="dividing"):
        lap.LAP2d(4, heads=3)
    with pytest.raises(ValueError, match="combine rule"):
        lap.combine_maps([torch.zeros(1, 2, 2)], (4, 4), "max")


@pytest.mark.parametrize("arch", ARCHS)
def test_insertion_keeps_a_network_exactly_and_every_backbone_keeps_its_shapes(arch):
    torch.manual_seed(0)
    model = build_backbone(arch, 5, small_input=True, width=0.0625 if arch in ("vgg16", "vgg16_bn", "resnet50") else 0.125).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
    where = "local_pools" if arch == "densenet121" else "global"  # DenseNet's global pool is a function
    names = lap.insert_lap(model, where=where, image_size=32, init_std=0.0)
    assert names and all(isinstance(model.get_submodule(n), lap.LAP2d) for n in names)
    with torch.no_grad():
        after = model(images)
    assert after.shape == (2, 5)
    # average pools replaced (DenseNet's transitions too): uniform weights at initialisation, the same function
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    maps, _ = lap.interpretation_map(model, images)
    assert maps.shape == (2, 32, 32)


def _pooled_net(init_std=None):
    """conv1×1 (hand-set) -> ReLU -> average pool -> linear; the pool replaced by a seeded 4-head-mean LAP
    (alpha 5) unless `init_std` is None."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.linspace(-1, 1, 24).view(8, 3, 1, 1))
        model[0].bias.fill_(0.1)
        model[4].weight.copy_(torch.linspace(-2, 2, 24).view(3, 8))
        model[4].bias.zero_()
    if init_std is not None:
        torch.manual_seed(0)
        lap.insert_lap(model, where=["2"], heads=4, head_mode="mean", alpha_init=5.0, reduction=2, init_std=init_std,
                       image_size=6)
    return model.eval()


def test_cross_entropy_alone_reaches_the_attention_and_alpha_at_insertion():
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = _pooled_net()(x)
    grads = {}
    for std in (0.0, lap.INIT_STD):
        model = _pooled_net(std)
        out = model(x)
        # near identity: the inserted network's logits within 1e-4 of the average-pooled ones (exact at 0)
        torch.testing.assert_close(out, plain, rtol=0, atol=1e-4 if std else 1e-6)
        F.cross_entropy(out, torch.tensor([0, 1, 2, 0])).backward()
        layer = model[2]
        grads[std] = [layer.attention[-1].weight.grad, layer.attention[0].weight.grad, layer.raw_alpha.grad]
    # the zero initialisation is a saddle of gauss_max (every gradient exactly 0); the seeded one is not
    assert all(g.abs().max() == 0 for g in grads[0.0])
    assert all(g.abs().max() > 0 for g in grads[lap.INIT_STD])


def test_efficientnet_lite0_global_pool_keeps_flattening():
    timm = pytest.importorskip("timm")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
    assert lap.insert_lap(model, image_size=32, init_std=0.0) == ["global_pool"]
    with torch.no_grad():
        torch.testing.assert_close(model(images), before, rtol=1e-5, atol=1e-5)


def test_maps_combine_by_product_mean_or_last_and_read_class_heads():
    coarse, fine = torch.full((1, 1, 1), 0.5), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(lap.combine_maps([coarse, fine], (2, 2), "prod"), 0.5 * fine)
    torch.testing.assert_close(lap.combine_maps([coarse, fine], (2, 2), "mean"), (0.5 + fine) / 2)
    torch.testing.assert_close(lap.combine_maps([coarse, fine], (2, 2), "last"), fine)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), lap.LAP2d(4, heads=3, head_mode="mean", flatten=True, init_std=0.0), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].attention[-1].bias.copy_(torch.tensor([-2.0, 0.0, 2.0]))
    _, logits = lap.interpretation_map(model, torch.randn(2, 3, 4, 4))
    picked = lap.layer_maps(model, head=torch.tensor([2, 0]))["1"]
    torch.testing.assert_close(picked[0], torch.full((4, 4), torch.sigmoid(torch.tensor(2.0)).item()))
    torch.testing.assert_close(picked[1], torch.full((4, 4), torch.sigmoid(torch.tensor(-2.0)).item()))


def test_weak_evidence_and_mask_injection_losses_by_hand():
    scores = torch.zeros(2, 3, 2, 2)
    scores[0, 1, 0, 0] = 10.0  # image 0, class 1: one salient position in its own head
    scores[1, 0] = 10.0        # image 1, class 2: head 0 (another class) salient everywhere
    targets = {"labels": torch.tensor([1, 2])}
    weak = WeakEvidenceLoss(layer="pool.attention", weight=2.0)
    a = torch.sigmoid(scores)
    pos = ((1 - a[0, 1].max()) + (1 - a[1, 2].max())) / 2
    neg = (a[0, [0, 2]].amax((1, 2)).mean() + a[1, [0, 1]].amax((1, 2)).mean()) / 2
    torch.testing.assert_close(weak(None, {"pool.attention": scores}, targets=targets), 2.0 * (pos + neg))
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :2, :2] = 1.0  # the top-left quarter = the top-left cell of the 2 x 2 map
    inject = MaskInjectionLoss(layer="pool.attention", weight=1.0)
    own = a[[0, 1], [1, 2]]
    inside = -torch.log(own[:, 0, 0]).mean()
    outside = -torch.log(1 - own.flatten(1)[:, 1:]).mean()
    got = inject(None, {"pool.attention": scores}, targets={**targets, "masks": masks})
    torch.testing.assert_close(got, inside + outside)


def test_mask_injection_averages_per_image_and_keeps_its_gradient_at_saturation():
    scores = torch.zeros(2, 1, 2, 2)
    scores[0, 0, 0, 0] = 2.0
    masks = torch.zeros(2, 1, 2, 2)
    masks[0, 0, 0, 0] = 1.0  # image 0: one evidence cell
    masks[1, 0, :, :1] = 1.0  # image 1: two evidence cells
    loss = MaskInjectionLoss(layer="a", weight=1.0)(None, {"a": scores}, targets={"labels": torch.zeros(2, dtype=torch.long),
                                                                                  "masks": masks})
    a = torch.sigmoid(scores[:, 0])
    inside = (-torch.log(a[0, 0, 0]) - torch.log(a[1, :, 0]).mean()) / 2  # per image, then the mean (not pooled)
    outside = (-torch.log(1 - a[0]).flatten()[1:].mean() - torch.log(1 - a[1, :, 1]).mean()) / 2
    torch.testing.assert_close(loss, inside + outside)
    # an evidence cell scored -30: log(sigmoid + eps) would flatten there, logsigmoid keeps d/dS = -1 / cells
    saturated = torch.full((1, 1, 1, 2), -30.0, requires_grad=True)
    one = torch.tensor([[[[1.0, 0.0]]]])
    MaskInjectionLoss(layer="a")(None, {"a": saturated}, targets={"labels": torch.zeros(1, dtype=torch.long),
                                                                  "masks": one}).backward()
    assert saturated.grad[0, 0, 0, 0] == pytest.approx(-1.0, abs=1e-6)
    # an image without evidence adds no inside term (and no NaN)
    empty = MaskInjectionLoss(layer="a")(None, {"a": torch.zeros(1, 1, 2, 2)},
                                         targets={"labels": torch.zeros(1, dtype=torch.long), "masks": torch.zeros(1, 1, 2, 2)})
    torch.testing.assert_close(empty, -torch.log(torch.tensor(0.5)))


def test_lap_resets_its_sharpness_for_the_randomisation_check():
    layer = lap.LAP2d(4, alpha_init=3.0)
    with torch.no_grad():
        layer.raw_alpha.add_(2.0)
    layer.reset_parameters()
    assert layer.alpha.item() == pytest.approx(3.0)


@pytest.mark.parametrize("kernel,stride,padding,head_mode", [(None, None, 0, "mean"), (None, None, 0, "split"),
                                                             (2, 2, 0, "mean"), (3, 2, 1, "split")])
def test_pooling_map_holds_the_weights_the_forward_pass_used(kernel, stride, padding, head_mode):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    window = {} if kernel is None else dict(kernel=kernel, stride=stride, padding=padding)
    pool = lap.LAP2d(4, heads=2, head_mode=head_mode, weight_mode="softmax", alpha_init=3.0, init_std=1.0, **window)
    plane = torch.randn(2, 1, 6, 6, generator=generator)
    # every channel the same plane: each output is the channel-mean weight map times the plane, window by window
    out = pool(plane.expand(2, 4, 6, 6))
    weights = pool.pooling_map
    assert weights.shape == (2, 6, 6)
    if kernel is None:
        torch.testing.assert_close(out.mean(1).flatten(), (weights * plane[:, 0]).sum((1, 2)))
        torch.testing.assert_close(weights.sum((1, 2)), torch.ones(2))
    else:
        # the windows' pooled values sum to the map-weighted plane (each position weighed in every window it is in)
        torch.testing.assert_close(out.mean(1).sum((1, 2)), (weights * plane[:, 0]).sum((1, 2)))
        windows = out.shape[-1] * out.shape[-2]
        torch.testing.assert_close(weights.sum((1, 2)), torch.full((2,), float(windows)))
    assert (pool.pooling_departure > 0).all() and (pool.pooling_departure < 1).all()


def test_pooling_departure_is_zero_for_average_pooling_and_one_minus_one_over_n_for_one_position():
    x = torch.randn(2, 3, 4, 4)
    uniform = nn.Sequential(lap.LAP2d(3, heads=1, init_std=0.0, flatten=True))
    torch.testing.assert_close(lap.pooling_departure(uniform, x, batch_size=1, device="cpu"), torch.zeros(2))
    torch.testing.assert_close(uniform[0].pooling_map, torch.full((1, 4, 4), 1 / 16))  # the last batch of one
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2] = 1.0
    sharp = _self_scored(1, 1e7)
    sharp(x)
    torch.testing.assert_close(sharp.pooling_departure, torch.tensor([1 - 1 / 16]))
    assert sharp.pooling_map[0, 1, 2] == pytest.approx(1.0) and sharp.pooling_map.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no LAP layer"):
        lap.pooling_departure(nn.Conv2d(3, 3, 1), x)


@pytest.mark.parametrize("pool,named", [(nn.MaxPool2d(2, ceil_mode=True), "ceil_mode"),
                                        (nn.MaxPool2d((2, 3)), "non-square"),
                                        (nn.AvgPool2d(3, 1, 1), "counts padding"),
                                        (nn.AdaptiveAvgPool2d(2), "not 1x1"),
                                        (nn.AdaptiveMaxPool2d(1), "not a global average")])
def test_insert_lap_refuses_pools_it_cannot_stand_in_for(pool, named):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), pool, nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=named):
        lap.insert_lap(model, where=["1"], image_size=8)


def test_insert_lap_keeps_the_models_dtype():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).double()
    lap.insert_lap(model, where=["1"], image_size=8, init_std=0.0)
    assert model[1].raw_alpha.dtype == torch.float64 and model(torch.zeros(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_pooling_departure_runs_in_eval_mode_and_restores_the_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), lap.LAP2d(4, flatten=True)).train()
    before = model[1].running_mean.clone()
    lap.pooling_departure(model, torch.randn(4, 3, 5, 5) + 3.0, device="cpu")
    assert model.training and torch.equal(model[1].running_mean, before)  # no batch statistics were taken

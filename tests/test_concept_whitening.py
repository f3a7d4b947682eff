"""Concept whitening (notebook 01): the CW layer against independent float64 references, the Cayley
step, the NaN guards, the alignment callback and the hierarchical objectives on tiny models."""
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from replication.methods.concept_whitening.alignment import (ConceptAlignment, ConceptSets, ConceptTree,
                                                             alignment_targets)
from replication.methods.concept_whitening.whitening import (ConceptWhitening, alignment_gradient, axis_activations,
                                                             cayley_step, check_orthogonal, iternorm_matrix,
                                                             replace_with_cw)
from replication.models.hooks import get_module


def correlated(d=8, m=20000, seed=0):
    """d x m columns with covariance eigenvalues 0.25..4 and mean 3."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    mix = q @ torch.diag(torch.linspace(0.5, 2, d, dtype=torch.float64)) @ q.T
    return mix @ torch.randn(d, m, generator=g, dtype=torch.float64) + 3


def as_maps(columns, positions=10):
    d, m = columns.shape
    return columns.T.reshape(m // positions, positions, d).permute(0, 2, 1).reshape(m // positions, d, positions, 1)


def numpy_iternorm(x, iterations, eps):
    """An independent float64 IterNorm (numpy): Σ, trace normalisation, Newton iterations."""
    x = x - x.mean(1, keepdims=True)
    sigma = x @ x.T / x.shape[1] + eps * np.eye(len(x))
    trace = np.trace(sigma)
    p = np.eye(len(x))
    for _ in range(iterations):
        p = 1.5 * p - 0.5 * p @ p @ p @ (sigma / trace)
    return p / np.sqrt(trace)


def test_whitening_gives_identity_covariance():
    columns = correlated()
    layer = ConceptWhitening(8).train()
    out = layer(as_maps(columns).float())
    flat = out.transpose(0, 1).reshape(8, -1).double()
    assert torch.cov(flat, correction=0).sub(torch.eye(8, dtype=torch.float64)).abs().max() < 1e-4
    assert flat.mean(1).abs().max() < 1e-5
    assert not torch.allclose(torch.cov(columns), torch.eye(8, dtype=torch.float64), atol=0.1)  # the input was not white


def test_iternorm_matches_an_independent_reference():
    columns = correlated(d=6, m=3000, seed=1)
    ours = iternorm_matrix(columns - columns.mean(1, keepdim=True), iterations=10, eps=1e-5)
    reference = numpy_iternorm(columns.numpy(), 10, 1e-5)
    np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=1e-10)
    # a few Newton iterations are IterNorm, not exact ZCA: the layer must not be an eigendecomposition
    few = iternorm_matrix(columns - columns.mean(1, keepdim=True), iterations=3, eps=1e-5)
    np.testing.assert_allclose(few.numpy(), numpy_iternorm(columns.numpy(), 3, 1e-5), rtol=0, atol=1e-10)
    values, vectors = np.linalg.eigh(np.cov(columns.numpy(), bias=True) + 1e-5 * np.eye(6))
    zca = vectors @ np.diag(values ** -0.5) @ vectors.T
    assert np.abs(few.numpy() - zca).max() > 1e-3


def test_running_statistics_follow_the_momentum_and_eval_uses_them():
    columns = correlated(d=4, m=400, seed=2)
    layer = ConceptWhitening(4, momentum=0.05).train()
    layer(as_maps(columns).float())
    mean = columns.mean(1)
    wm = iternorm_matrix(columns - mean[:, None], iterations=10, eps=1e-5)
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.05 * mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(layer.running_wm.numpy(), (0.95 * torch.eye(4, dtype=torch.float64) + 0.05 * wm).numpy(),
                               rtol=1e-5, atol=1e-6)
    layer.eval()
    maps = as_maps(columns).float()
    first, again = layer(maps), layer(maps)
    assert torch.equal(first, again)
    assert torch.equal(layer(maps[:3]), first[:3])  # eval output of an image does not depend on its batch


def test_cayley_step_against_the_formula_and_conditions():
    g = torch.Generator().manual_seed(3)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    gradient = torch.randn(6, 6, generator=g, dtype=torch.float64)
    result = cayley_step(rotation, gradient)
    assert result.accepted and result.after <= result.before
    r, grad, tau = rotation.numpy(), gradient.numpy(), result.tau
    a = grad @ r.T - r @ grad.T
    y = np.linalg.inv(np.eye(6) + tau / 2 * a) @ (np.eye(6) - tau / 2 * a) @ r
    np.testing.assert_allclose(result.rotation.numpy(), y, atol=1e-12)
    objective = lambda t: np.sum(grad * (np.linalg.inv(np.eye(6) + t / 2 * a) @ (np.eye(6) - t / 2 * a) @ r))  # noqa: E731
    slope0 = -0.5 * np.sum(a * a)
    assert objective(tau) <= objective(0) + 1e-4 * tau * slope0 + 1e-12  # Armijo
    slope = (objective(tau + 1e-6) - objective(tau - 1e-6)) / 2e-6
    assert slope >= 0.9 * slope0 - 1e-6  # weak Wolfe
    assert check_orthogonal(result.rotation) < 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_cayley_step_never_lowers_the_alignment(seed):
    g = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))[0].float()
    gradient = torch.randn(10, 10, generator=g) * 10 ** (seed - 2)
    result = cayley_step(rotation, gradient)
    alignment = lambda r: -float((gradient.double() * r.double()).sum())  # noqa: E731
    assert alignment(result.rotation) >= alignment(rotation) - 1e-9


def test_rotation_stays_orthogonal_over_many_updates():
    torch.manual_seed(4)
    layer = ConceptWhitening(16)
    for _ in range(30):
        layer.accumulate({j: torch.randn(16) * 100 for j in range(5)})
        layer.counter[:5] += 1
        layer.update_rotation(steps=2)
    assert check_orthogonal(layer.running_rot) < 1e-5
    assert layer.skipped_updates == 0 and not torch.equal(layer.running_rot, torch.eye(16))


def test_counter_is_per_concept_as_in_the_official_update():
    """Axis 0 gets two concept batches, axis 1 one, before an update: the official code smooths sum_G per
    batch and divides row j by counter[j] = batches of j + 0.001 (a scalar counter would divide by 3.001)."""
    layer = ConceptWhitening(4, mode="mean").eval()  # fresh buffers: the whitened map is the input itself
    g = torch.Generator().manual_seed(7)
    batches = [(0, torch.randn(5, 4, 3, 3, generator=g)), (0, torch.randn(5, 4, 3, 3, generator=g)),
               (1, torch.randn(5, 4, 3, 3, generator=g))]
    sum_g, counter = np.zeros((4, 4)), np.full(4, 0.001)
    for axis, batch in batches:
        with layer.record(axis) as rows:
            layer(batch)
        layer.accumulate({axis: rows[0]})
        sum_g[axis] = 0.05 * -batch.double().mean((0, 2, 3)).numpy() + 0.95 * sum_g[axis]
        counter[axis] += 1
    expected = sum_g / counter[:, None]
    np.testing.assert_allclose(layer.counter.numpy(), [2.001, 1.001, 0.001, 0.001])
    np.testing.assert_allclose(layer.gradient().numpy(), expected, rtol=1e-6, atol=1e-9)
    first = cayley_step(layer.running_rot, torch.from_numpy(expected))
    results = layer.update_rotation(steps=1)
    np.testing.assert_allclose(results[0].rotation.double().numpy(), first.rotation.double().numpy(), atol=1e-6)
    assert results[0].before == pytest.approx(np.trace(expected))  # F = <G, I>
    assert torch.equal(layer.counter, torch.full((4,), 0.001, dtype=torch.float64))  # reset after the update
    with pytest.raises(ValueError, match="axis 4 does not exist"):
        with layer.record(4):
            pass


def test_nan_row_is_dropped_and_later_updates_proceed(caplog):
    layer = ConceptWhitening(4).eval()
    batch = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    corrupt = batch.clone()
    corrupt[0, 1, 0, 0] = float("nan")  # one corrupt value poisons the gradient row
    with layer.record(0) as rows:
        layer(corrupt)
    with caplog.at_level(logging.WARNING):
        layer.accumulate({0: rows[0]})
    assert int(layer.dropped_rows) == 1 and "not finite" in caplog.text
    assert torch.isfinite(layer.sum_G).all()  # the never-reset average is not poisoned
    layer.update_rotation()
    assert torch.equal(layer.running_rot, torch.eye(4)) and int(layer.skipped_updates) == 0
    with layer.record(0) as rows:
        layer(batch)
    layer.accumulate({0: rows[0]})
    layer.update_rotation()
    assert not torch.equal(layer.running_rot, torch.eye(4))  # a later clean batch still rotates


def test_nan_guard_skips_a_non_finite_gradient_matrix(caplog):
    layer = ConceptWhitening(4)
    layer.sum_G[0, 1] = float("inf")
    with caplog.at_level(logging.WARNING):
        layer.update_rotation()
    assert torch.equal(layer.running_rot, torch.eye(4)) and int(layer.skipped_updates) == 1
    assert "not finite" in caplog.text


def test_failed_line_search_is_skipped_and_logged(caplog):
    layer = ConceptWhitening(4)
    layer.sum_G[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    with caplog.at_level(logging.WARNING):
        results = layer.update_rotation(steps=2, max_bisections=0, tau=1e12)  # Armijo cannot hold at such a tau
    assert len(results) == 1 and not results[0].accepted
    assert torch.equal(layer.running_rot, torch.eye(4)) and int(layer.skipped_updates) == 1
    assert "line search failed" in caplog.text


def test_pool_max_gradient_uses_each_rotated_channels_block_maxima():
    xhat = torch.arange(2 * 2 * 3 * 3, dtype=torch.float64).reshape(2, 2, 3, 3)
    rotated = torch.zeros_like(xhat)
    rotated[:, 0, 0, 0] = 5.0  # channel 0's block maximum at the corner
    rotated[:, 1, 2, 2] = 5.0  # channel 1's at the opposite corner
    expected = -torch.tensor([(0 + 18) / 2, (17 + 35) / 2], dtype=torch.float64)
    torch.testing.assert_close(alignment_gradient(xhat, rotated, "pool_max"), expected)
    torch.testing.assert_close(alignment_gradient(xhat, rotated, "mean"), -xhat.mean((0, 2, 3)))
    assert axis_activations(rotated, "pool_max")[0].tolist() == [5.0, 5.0]
    positive = torch.tensor([[[[1.0, -1.0], [3.0, -2.0]]]])
    assert axis_activations(positive, "pos_mean").item() == pytest.approx(4 / (2 + 1e-4))
    assert axis_activations(positive, "max").item() == 3.0 and axis_activations(positive, "mean").item() == 0.25


def tiny_tree():
    return ConceptTree(("warm", "cold", "red", "yellow", "blue"), (None, None, "warm", "warm", "cold"))


def test_tree_and_objectives():
    tree = tiny_tree()
    assert tree.leaves == ["red", "yellow", "blue"] and tree.leaves_under("warm") == ["red", "yellow"]
    assert tree.branch("yellow") == "warm" and tree.depth("blue") == 1
    assert alignment_targets(tree, "flat") == {n: {i: 1.0} for i, n in enumerate(tree.nodes)}
    ancestor = alignment_targets(tree, "ancestor", 0.5)
    assert ancestor["red"] == {2: 1.0, 0: 0.5} and ancestor["warm"] == {0: 1.0}
    matched = alignment_targets(tree, "matched", 0.5)
    assert matched["warm"] == {0: 2.0} and matched["cold"] == {1: 1.5} and matched["red"] == {2: 1.0}
    with pytest.raises(ValueError, match="objective"):
        alignment_targets(tree, "subspace")


def test_tree_from_world_file(tmp_path):
    node = lambda name, category, *children: {"name": name, "category": category, "children": list(children)}  # noqa: E731
    tree = node("thing", None, node("vehicle", None, node("car", "object", node("wheel", "part"))),
                node("plant", None, node("tree", "object"), node("flower", "object")))
    (tmp_path / "concept_tree.json").write_text(json.dumps(tree))
    loaded = ConceptTree.from_world(tmp_path, levels=2)
    assert loaded.nodes == ("vehicle", "plant", "car", "tree", "flower")
    assert loaded.parents == (None, None, "vehicle", "plant", "plant")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def colour_sets(tree, per_leaf=24, size=6):
    """Images of one colour each: red, yellow (= red + green) and blue, with noise."""
    g = torch.Generator().manual_seed(5)
    colours = {"red": [1.0, 0, 0], "yellow": [1.0, 1.0, 0], "blue": [0, 0, 1.0]}
    images, leaf = [], []
    for index, name in enumerate(tree.leaves):
        base = torch.tensor(colours[name])[:, None, None].expand(3, size, size)
        images.append(base + 0.3 * torch.randn(per_leaf, 3, size, size, generator=g))
        leaf += [index] * per_leaf
    leaf = torch.tensor(leaf)
    members = {n: torch.cat([torch.nonzero(leaf == tree.leaves.index(l)).flatten() for l in tree.leaves_under(n)])
               for n in tree.nodes}
    return ConceptSets(tree, torch.cat(images), leaf, members)


def aligned_net(objective, lambda_h=1.0, calls=15, concept_batch=16):
    torch.manual_seed(0)
    model = TinyNet()
    replace_with_cw(model, ["bn"])
    tree = tiny_tree()
    sets = colour_sets(tree)
    model.train()
    model(sets.images)  # running statistics from one training batch
    model.bn.momentum = 1.0
    model(sets.images)
    model.bn.momentum = 0.05
    callback = ConceptAlignment(("bn",), tree, sets.fingerprint(), interval=1, objective=objective, lambda_h=lambda_h,
                                concept_batch=concept_batch, concepts=sets)
    for step in range(1, calls + 1):
        callback(model, step=step, epoch=1)
    return model, sets


def axis_scores(model, sets):
    with torch.no_grad():
        model.eval()
        captured = {}
        handle = get_module(model, "bn.rotated").register_forward_hook(lambda m, i, o: captured.update(out=o))
        model(sets.images)
        handle.remove()
    return axis_activations(captured["out"], "pool_max")


def test_alignment_puts_each_concept_on_its_axis():
    model, sets = aligned_net("flat")
    assert check_orthogonal(model.bn.running_rot) < 1e-5 and int(model.bn.skipped_updates) == 0
    scores = axis_scores(model, sets)
    tree = sets.tree
    for leaf in tree.leaves:
        axis, own = tree.axis(leaf), sets.members[leaf]
        others = torch.ones(len(sets.leaf), dtype=torch.bool)
        others[own] = False
        assert scores[own, axis].mean() > scores[others, axis].mean() + 0.1, leaf


def test_ancestor_objective_changes_the_rotation():
    flat, sets = aligned_net("flat")
    ancestor, _ = aligned_net("ancestor", lambda_h=1.0)
    assert (flat.bn.running_rot - ancestor.bn.running_rot).abs().max() > 1e-3
    zero, _ = aligned_net("ancestor", lambda_h=0.0)
    assert torch.equal(zero.bn.running_rot, flat.bn.running_rot)  # λ_h = 0 is the flat objective


def test_alignment_trace_records_every_update_and_survives_a_reload(tmp_path):
    from replication.models.backbones import load_weights
    model, sets = aligned_net("flat", calls=3)
    trace = model.bn.trace
    assert trace.shape == (6, 7)  # 3 updates x 2 Cayley steps
    assert trace[:, 0].tolist() == [1, 1, 2, 2, 3, 3] and trace[:, 1].tolist() == [1, 2] * 3
    assert (trace[:, 3] <= trace[:, 2]).all() and (trace[:, 6] == 1).all()  # F never rises; all accepted
    fresh = TinyNet()
    replace_with_cw(fresh, ["bn"])
    torch.save(model.state_dict(), tmp_path / "model.pt")
    load_weights(fresh, tmp_path / "model.pt")  # as the cache loads it: the saved trace's length, not the fresh layer's
    assert torch.equal(fresh.bn.trace, trace)
    from replication.methods.concept_whitening.experiment import Finetuned, alignment_trace
    table = alignment_trace(Finetuned("tiny", 0, "flat", ("bn",), model, None), interval=5)
    assert table.train_step.tolist() == [5, 5, 10, 10, 15, 15] and not table.skipped.any()
    assert table.before.iloc[0] == pytest.approx(float(trace[0, 2]))
    import matplotlib.pyplot as plt
    from replication.methods.concept_whitening.figures import plot_alignment_trace
    figure = plot_alignment_trace(table)
    assert len(figure.axes[0].lines) == 3  # before, after, skipped markers of the one run
    plt.close(figure)


def test_hierarchical_objective_equals_the_weight_matched_flat_one_on_full_concept_sets():
    """With every concept batch the node's whole set (a parent's = the union of its equal-sized children's),
    H1's parent row g(parent) + λ Σ g(child) is exactly (1 + λ·children) g(parent): H1 is the weight-matched
    flat CW, which is why notebook 01 runs that control."""
    ancestor, _ = aligned_net("ancestor", lambda_h=1.0, calls=3, concept_batch=1000)
    matched, _ = aligned_net("matched", lambda_h=1.0, calls=3, concept_batch=1000)
    flat, _ = aligned_net("flat", calls=3, concept_batch=1000)
    torch.testing.assert_close(ancestor.bn.running_rot, matched.bn.running_rot, atol=1e-5, rtol=0)
    assert (ancestor.bn.running_rot - flat.bn.running_rot).abs().max() > 1e-3


def test_calibration_replaces_the_ema_by_the_batches_average():
    from replication.methods.concept_whitening.alignment import calibrate_statistics
    torch.manual_seed(3)
    model = TinyNet()
    replace_with_cw(model, ["bn"])
    images = torch.randn(12, 3, 5, 5) + 1
    conv_before = model.conv.weight.clone()
    model.train()
    calibrate_statistics(model, ["bn"], images, batch_size=6)
    with torch.no_grad():
        maps = [model.conv(images[:6]).double(), model.conv(images[6:]).double()]
    columns = [m.transpose(0, 1).reshape(8, -1) for m in maps]
    means = [c.mean(1) for c in columns]
    wms = [iternorm_matrix(c - mu[:, None]) for c, mu in zip(columns, means)]
    np.testing.assert_allclose(model.bn.running_mean.numpy(), ((means[0] + means[1]) / 2).numpy(), atol=1e-5)
    np.testing.assert_allclose(model.bn.running_wm.numpy(), ((wms[0] + wms[1]) / 2).numpy(), atol=1e-4)
    assert model.training and model.bn.training and model.bn.momentum == 0.05  # modes and momentum restored
    assert torch.equal(model.conv.weight, conv_before)
    tree = tiny_tree()
    sets = colour_sets(tree)
    fresh = TinyNet()
    fresh.load_state_dict(model.state_dict(), strict=False)
    replace_with_cw(fresh, ["bn"])
    callback = ConceptAlignment(("bn",), tree, sets.fingerprint(), interval=1, concept_batch=6, concepts=sets,
                                calibration=12, calibration_images=images)
    callback.align(fresh)  # the first call calibrates before aligning
    torch.testing.assert_close(fresh.bn.running_mean, model.bn.running_mean)


def test_replace_with_cw_refuses_other_layers():
    model = TinyNet()
    with pytest.raises(ValueError, match="not BatchNorm2d"):
        replace_with_cw(model, ["bn", "conv"])
    assert isinstance(model.conv, nn.Conv2d) and isinstance(model.bn, nn.BatchNorm2d)  # nothing half-replaced
    with pytest.raises(ValueError):
        replace_with_cw(model, ["bn", "no_such_layer"])
    assert isinstance(model.bn, nn.BatchNorm2d)
    layers = replace_with_cw(model, ["bn"])
    assert isinstance(model.bn, ConceptWhitening) and layers["bn"].channels == 8
    with pytest.raises(ValueError, match="channels"):
        model.bn(torch.randn(2, 4, 3, 3))


def test_replace_with_cw_keeps_the_device_of_a_bn_without_affine_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)).to("meta")
    layers = replace_with_cw(model, ["1"])
    assert layers["1"].running_rot.device.type == "meta"


def test_empty_concept_node_and_a_narrow_layer_give_clear_errors():
    tree = tiny_tree()
    sets = colour_sets(tree)
    members = {**sets.members, "blue": torch.zeros(0, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"\['blue'\] have no crops"):
        ConceptSets(tree, sets.images, sets.leaf, members)
    model = TinyNet()
    replace_with_cw(model, ["bn"])
    wide = ConceptTree(tuple(f"n{i}" for i in range(9)), (None,) * 9)
    wide_sets = ConceptSets(wide, sets.images[:9], torch.arange(9), {f"n{i}": torch.tensor([i]) for i in range(9)})
    callback = ConceptAlignment(("bn",), wide, wide_sets.fingerprint(), concepts=wide_sets)
    with pytest.raises(ValueError, match=r"9 nodes .* \{'bn': 8\}"):
        callback.align(model)


@pytest.mark.parametrize("profile", ["ci", "default", "gpu"])
def test_profile_cw_layers_are_batchnorms_of_their_networks(profile):
    from replication.methods.concept_whitening import CWSettings
    from replication.models.backbones import BackboneConfig
    from replication.profiles import load_profile

    loaded = load_profile(profile)
    settings = loaded.build(CWSettings, "cw")
    for network in settings.networks:
        config = loaded.build(BackboneConfig, "model", arch=network, **settings.model_overrides.get(network, {}))
        model = config.build(18)
        for layer in (settings.layers[network], settings.second_layers.get(network)):
            if layer is not None:
                assert isinstance(get_module(model, layer), nn.BatchNorm2d), (profile, network, layer)


def test_each_placement_of_a_run_has_its_own_name():
    from replication.methods.concept_whitening.experiment import MAIN, SECOND_DEPTH, TWO_DEPTHS, Finetuned
    runs = [Finetuned("resnet18", 1, "ancestor", ("layer4.1.bn1",), None, None),
            Finetuned("resnet18", 1, "ancestor", ("layer3.0.bn1",), None, None, SECOND_DEPTH),
            Finetuned("resnet18", 1, "ancestor", ("layer3.0.bn1", "layer4.1.bn1"), None, None, TWO_DEPTHS)]
    assert runs[0].placement == MAIN
    assert [r.name for r in runs] == ["resnet18_s1_ancestor", "resnet18_s1_ancestor_layer3.0.bn1",
                                      "resnet18_s1_ancestor_layer3.0.bn1+layer4.1.bn1"]

"""CGL regularisers: hand-computed values on tiny tensors, the group partition, where gradients go,
determinism of the pair sampling, and a regularised training step on CPU (and CUDA when present).

Exact 0/1 soft maps come from the batch-norm form of psi: with a BN gamma of 1e-3 and BN outputs of
+-1, psi = sigmoid(y / gamma) is exactly 1 or 0 in float32, so distances are plain set arithmetic.
"""
import copy
import dataclasses
import gc
import math
import pickle
import weakref

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from replication import runtime
from replication.analysis.dissection import DissectionConfig, dissect
from replication.analysis.features import dissect_layers
from replication.data.broden import BrodenDataset
from replication.data.subsets import InMemoryItems, seeded_indices, seeded_subset, split_indices
from replication.methods.concept_groups import (
    PAPER_SCHEDULE,
    PAPER_TRAIN_IMAGES,
    BlockNorm,
    CGLConfig,
    CGLSettings,
    GroupActivationLoss,
    SoftReceptiveField,
    SpatialLoss,
    TrainedModel,
    VariantRecipe,
    activation_layers,
    build_model,
    cgl_loss_terms,
    dissected_layers,
    dissection_tables,
    group_purity,
    group_statistics,
    group_weight_norms,
    grouped_layers,
    integrated_lr,
    mask_overlap,
    partition_filters,
    plot_relevance,
    purity_pairs,
    ratio_of_unique_detectors,
    relevance_distributions,
    relevance_summary,
    relevance_table,
    run_group_statistics,
    select_lambda,
    shrinkage_budget,
    soft_iou_distance,
    spatial_spread,
    train_variant,
    training_record,
    weight_correlation,
    within_group_distance,
)
from replication.methods.concept_groups.eager_kernels import GroupShiftL1, SpatialSpread, StdSoftMap
from replication.models.anatomy import conv_layers
from replication.models.backbones import build_backbone
from replication.models.hooks import capture_activations
from replication.models.small_cnns import TwoLayerCNN
from replication.training import loop
from replication.training.loop import TrainConfig
from replication.reporting.claims import load_reference
from replication.training.loop import TrainConfig, train
from tests.broden_fixture import write_tiny_broden
from tests.helpers import assert_close


def indicator_bn(*channels: int) -> nn.Sequential:
    """BN modules whose gamma = 1e-3 turns outputs of +-1 into exact 0/1 soft maps."""
    model = nn.Sequential(*(nn.BatchNorm2d(c) for c in channels))
    with torch.no_grad():
        for bn in model:
            bn.weight.fill_(1e-3)
    return model


def masks(*rows) -> torch.Tensor:
    """Rows of 0/1 masks (one per channel, flattened 2x2) -> BN outputs of +-1, shape 1 x C x 2 x 2."""
    return (torch.tensor(rows, dtype=torch.float32) * 2 - 1).reshape(1, len(rows), 2, 2)


# -------------------------------------------------------------------------------------- partition
def test_partition_code_default_leaves_remainder_free():
    part = partition_filters(12, groups=5)
    assert (part.group_size, part.grouped, part.free) == (2, 10, 2)
    assert part.group_of().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, -1, -1]
    split = part.split(torch.arange(12.0), dim=0)
    assert split.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_partition_explicit_free_filters_and_errors():
    part = partition_filters(14, groups=4, free_filters=2)
    assert (part.group_size, part.free) == (3, 2)
    with pytest.raises(ValueError, match="cannot split 14 filters into 4 equal groups with 1 free"):
        partition_filters(14, groups=4, free_filters=1)
    assert partition_filters(8, groups=5).group_size == 1  # fine for the block norm
    with pytest.raises(ValueError, match="1 filter\\(s\\) per group; at least 2 are needed for within-group pairs"):
        partition_filters(8, groups=5, min_size=2)
    with pytest.raises(ValueError, match="at least 2 are needed"):
        GroupActivationLoss(["0"], weight=1.0)(nn.Sequential(nn.Conv2d(1, 8, 1)), {"0": torch.randn(2, 8, 3, 3)})
    with pytest.raises(ValueError, match="groups must be >= 1"):
        partition_filters(8, groups=0)


def test_partition_split_on_channel_dim():
    x = torch.arange(2 * 7 * 3.0).reshape(2, 7, 3)
    split = partition_filters(7, groups=3).split(x, dim=1)
    assert split.shape == (2, 3, 2, 3)
    assert torch.equal(split[1, 2, 1], x[1, 5])


# ------------------------------------------------------------------------------ psi and distances
def test_soft_iou_distance_is_one_minus_iou_on_sets():
    a = torch.tensor([1.0, 1, 0, 0])
    assert_close(soft_iou_distance(a, torch.tensor([0.0, 1, 1, 0])), 2 / 3)  # IoU = 1/3
    assert_close(soft_iou_distance(a, torch.tensor([0.0, 0, 1, 1])), 1.0)
    assert_close(soft_iou_distance(a, a), 0.0)
    assert_close(soft_iou_distance(torch.zeros(3), torch.zeros(3)), 0.0)
    soft = soft_iou_distance(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))  # 2*1 / (1 + 1 + 1)
    assert_close(soft, 2 / 3)


def test_soft_receptive_field_std_form():
    a = torch.tensor([1.0, -1.0, 3.0, -3.0]).reshape(1, 2, 1, 2)  # channel stds sqrt(2), sqrt(18)
    psi = SoftReceptiveField()(a)
    expected = torch.sigmoid(torch.tensor([1 / (2**0.5 + 5e-3), -1 / (2**0.5 + 5e-3), 3 / (18**0.5 + 5e-3), -3 / (18**0.5 + 5e-3)]))
    assert_close(psi.flatten(), expected)
    shifted = SoftReceptiveField(p1=2.0, p2=0.5, std_eps=0.0)(a)
    assert_close(shifted.flatten()[0], torch.sigmoid(torch.tensor(2 / 2**0.5 + 0.5)))


def test_soft_receptive_field_bn_form_undoes_affine():
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -0.5]))
        bn.bias.copy_(torch.tensor([1.0, 3.0]))
    y = torch.tensor([4.0, 1.0]).reshape(1, 2, 1, 1)  # tau = y / gamma = a_hat + beta / gamma
    assert_close(SoftReceptiveField()(y, bn).flatten(), torch.sigmoid(torch.tensor([2.0, -2.0])))


def test_activation_modified_in_place_after_capture_is_rejected():
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(inplace=True))
    term = SpatialLoss(["0"], weight=1.0)
    x = torch.randn(2, 1, 3, 3)
    with capture_activations(model, term.layers, detach=False, clone=False) as acts:
        model(x)
        with pytest.raises(RuntimeError, match="modified in place.*clone=True"):
            term(model, acts)
    with capture_activations(model, term.layers, detach=False) as acts:  # clone=True: the pre-ReLU map
        model(x)
        assert acts["0"].min() < 0
        assert torch.isfinite(term(model, acts))


# --------------------------------------------------------------------------------------- L_g
def two_group_batch() -> torch.Tensor:
    """Sample 1: group 0 D = 2/3, group 1 D = 1. Sample 2: group 0 D = 0, group 1 D = 1/4."""
    first = masks([1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1])
    second = masks([1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0])
    return torch.cat([first, second])


@pytest.mark.parametrize("sampling", ["shift", "uniform"])
def test_group_activation_loss_per_sample_value(sampling):
    model = indicator_bn(4)
    term = GroupActivationLoss(["0"], weight=0.5, groups=2, pair_sampling=sampling)
    # group 0: (2/3 + 0)/2, group 1: (1 + 1/4)/2; pairs are (0,1) or (1,0), D is symmetric
    assert_close(term(model, {"0": two_group_batch()}), 0.5 * (1 / 3 + 5 / 8))
    single = term(model, {"0": two_group_batch()[:1]})
    assert_close(single, 0.5 * (2 / 3 + 1))


@pytest.mark.parametrize("sampling", ["shift", "uniform"])
def test_group_activation_loss_batch_level_value(sampling):
    model = indicator_bn(4)
    term = GroupActivationLoss(["0"], weight=1.0, groups=2, reduction="batch", pair_sampling=sampling)
    # L1 over batch and space: group 0 |diff| 2, masses 3, 3 -> 1/2; group 1 |diff| 3, masses 5, 4 -> 1/2
    assert_close(term(model, {"0": two_group_batch()}), 1.0)


def test_group_activation_loss_identical_groups_is_zero_and_free_filters_ignored():
    model = indicator_bn(5)
    acts = masks([1, 0, 1, 0], [1, 0, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1])  # last one free
    term = GroupActivationLoss(["0"], weight=1.0, groups=2)
    assert_close(term(model, {"0": acts}), 0.0)


def test_shift_pairs_of_three_filters_cover_all_pairs():
    """With N_g = 3 every shift (1 or 2) pairs each filter with a different neighbour: all 3 pairs, exactly."""
    torch.manual_seed(0)
    acts = torch.randn(2, 7, 3, 3)
    model = nn.Sequential(nn.Conv2d(1, 7, 1))
    term = GroupActivationLoss(["0"], weight=1.0, groups=2)
    expected = within_group_distance(SoftReceptiveField()(acts), partition_filters(7, 2)).sum()
    assert_close(term(model, {"0": acts}), expected, atol=1e-6)


def test_fused_functions_match_autograd_gradients():
    generator = torch.Generator().manual_seed(0)
    flat = torch.rand(2, 11, 6, dtype=torch.float64, generator=generator, requires_grad=True)  # 2 groups of 5, 1 free
    assert torch.autograd.gradcheck(lambda m: GroupShiftL1.apply(m, 2, 5, (1, 3, 3)), (flat,))
    psi = torch.rand(2, 3, 4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    ys, xs = torch.arange(4.0, dtype=torch.float64), torch.arange(5.0, dtype=torch.float64) / 4
    assert torch.autograd.gradcheck(lambda p: SpatialSpread.apply(p, ys, xs, 1e-4), (psi,))
    act = torch.randn(3, 2, 2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    p1 = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    p2 = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, u, v: StdSoftMap.apply(a, u, v, 5e-3), (act, p1, p2))


def test_fused_soft_map_matches_the_formula():
    act = torch.randn(3, 4, 2, 5, generator=torch.Generator().manual_seed(1))
    expected = torch.sigmoid(2.0 * act / (act.std(dim=(0, 2, 3), keepdim=True) + 5e-3) + 0.5)
    assert_close(StdSoftMap.apply(act, torch.tensor(2.0), torch.tensor(0.5), 5e-3), expected)


def test_group_activation_layer_reduction_mean_vs_sum():
    model = indicator_bn(4, 4)
    acts = {"0": two_group_batch()[:1], "1": masks([1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0])}
    mean = GroupActivationLoss(["0", "1"], weight=1.0, groups=2)(model, acts)
    total = GroupActivationLoss(["0", "1"], weight=1.0, groups=2, layer_reduction="sum")(model, acts)
    assert_close(mean, (5 / 3 + 0) / 2)
    assert_close(total, 5 / 3)


def test_cross_layer_term_resizes_upper_layer():
    model = indicator_bn(4, 2)
    lower = masks([1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0])  # within-layer D = 0
    upper = torch.ones(1, 2, 1, 1)  # psi = 1 everywhere, resized to 2x2
    acts = {"0": lower, "1": upper}
    term = GroupActivationLoss(["0", "1"], weight=2.0, groups=1, cross_layer_weight=0.5)
    # cross D([1,1,0,0], [1,1,1,1]) = 2*2 / (2 + 4 + 2) = 1/2; one layer pair; within terms 0
    assert_close(term(model, acts), 2.0 * 0.5 * 0.5)
    with pytest.raises(ValueError, match="at least two layers"):
        GroupActivationLoss(["0"], weight=1.0, cross_layer_weight=0.5)


def draw(term: GroupActivationLoss):
    return term._pairs(3000, 5, 5, True, torch.device("cpu"))


def test_pairs_are_distinct_seeded_and_redrawn():
    torch.manual_seed(11)
    term = GroupActivationLoss(["0"], weight=1.0, seed=3)
    i, j = draw(term)
    assert bool((i != j).all())
    assert set(zip(i.tolist(), j.tolist())) == {(a, b) for a in range(5) for b in range(5) if a != b}
    again = draw(GroupActivationLoss(["0"], weight=1.0, seed=3))
    assert torch.equal(again[0], i) and torch.equal(again[1], j)
    assert not torch.equal(draw(GroupActivationLoss(["0"], weight=1.0, seed=4))[0], i)
    assert not torch.equal(draw(term)[0], i)  # redrawn every step


def test_pairs_restart_when_the_global_seed_changes():
    """The loop re-seeds torch every epoch: a fresh term (resumed run) then draws what a used one does."""
    used = GroupActivationLoss(["0"], weight=1.0, seed=3)
    torch.manual_seed(1)
    draw(used)
    torch.manual_seed(2)  # next epoch
    continued = draw(used)
    torch.manual_seed(2)
    resumed = draw(GroupActivationLoss(["0"], weight=1.0, seed=3))
    assert torch.equal(continued[0], resumed[0]) and torch.equal(continued[1], resumed[1])


def test_random_pairs_loss_is_deterministic_per_seed():
    torch.manual_seed(0)
    acts = {"0": torch.randn(3, 10, 4, 4)}
    model = nn.Sequential(nn.Conv2d(1, 10, 1))
    torch.manual_seed(0)
    values = [GroupActivationLoss(["0"], weight=1.0, groups=2, seed=s)(model, acts) for s in (0, 0, 1)]
    assert torch.equal(values[0], values[1])
    assert not torch.equal(values[0], values[2])


# --------------------------------------------------------------------------------------- L_s
def test_spatial_spread_hand_values():
    line = torch.tensor([1.0, 0, 1]).reshape(1, 1, 1, 3)
    assert_close(spatial_spread(line, eps=0.0), [[1.0]])  # centre x = 1, both masses at distance 1
    assert_close(spatial_spread(line, eps=0.0, normalise_coordinates=True), [[0.5]])
    diagonal = torch.tensor([[1.0, 0], [0, 1]]).reshape(1, 1, 2, 2)
    assert_close(spatial_spread(diagonal, eps=0.0), [[math.sqrt(0.5)]])
    point = torch.tensor([0.0, 1, 0]).reshape(1, 1, 1, 3)
    assert_close(spatial_spread(point, eps=0.0), [[0.0]])


def test_spatial_spread_eps_value():
    # eps = 1: mass 3, cx = (0 + 2)/3 = 2/3; spread = (|0 - 2/3| + |2 - 2/3|) / 3 = 2/3
    line = torch.tensor([1.0, 0, 1]).reshape(1, 1, 1, 3)
    assert_close(spatial_spread(line, eps=1.0), [[2 / 3]])


def test_spatial_gradient_finite_when_centre_on_a_pixel():
    psi = torch.tensor([0.2, 1.0, 0.2]).reshape(1, 1, 1, 3).requires_grad_()
    spatial_spread(psi).sum().backward()
    assert bool(torch.isfinite(psi.grad).all())


def test_spatial_loss_term_mean_over_maps_and_layers():
    model = indicator_bn(2, 1)
    acts = {"0": masks([1, 0, 0, 1], [1, 0, 0, 0]), "1": masks([1, 1, 0, 0])}
    term = SpatialLoss(["0", "1"], weight=3.0, eps=0.0)
    # layer 0: (sqrt(0.5) + 0) / 2; layer 1: 0.5; mean over layers
    assert_close(term(model, acts), 3.0 * (math.sqrt(0.5) / 2 + 0.5) / 2, rtol=1e-5)


# ------------------------------------------------------------------------------------- R_bn
def block_model() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(1, 5, 1), nn.Flatten(), nn.Linear(5, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([3.0, 4, 1, 2, 7]).reshape(5, 1, 1, 1))
    return model


def test_block_norm_value_and_gradients():
    model = block_model()
    term = BlockNorm(["0"], weight=0.1, groups=2)  # groups {3,4}, {1,2}; filter 7 free
    loss = term(model, {})
    assert_close(loss, 0.1 * (5 + math.sqrt(5)))
    loss.backward()
    expected = 0.1 * torch.tensor([0.6, 0.8, 1 / math.sqrt(5), 2 / math.sqrt(5), 0.0])
    assert_close(model[0].weight.grad.flatten(), expected)
    assert model[0].bias.grad is None and model[2].weight.grad is None
    assert term.decay_free_parameters(model) == [model[0].weight]
    assert term.layers == ()
    assert_close(BlockNorm(["0"], weight=1.0, groups=6)(model, {}), 0.0)  # 5 filters, 6 groups: all free [C]


def test_block_norm_zero_group_has_zero_gradient_and_nan_guard():
    model = block_model()
    with torch.no_grad():
        model[0].weight[:2] = 0
    term = BlockNorm(["0"], weight=1.0, groups=2)
    term(model, {}).backward()
    assert bool(torch.isfinite(model[0].weight.grad).all())
    with torch.no_grad():
        model[0].weight[0] = float("nan")
    assert_close(term(model, {}), 0.0)


def test_relevance_table_and_summary():
    model = block_model()
    table = relevance_table(model, ["0"], groups=2)
    assert_close(list(table["beta"]), [5.0, math.sqrt(5)])
    assert_close(table["share"].sum(), 1.0)
    with torch.no_grad():
        model[0].weight[2:4] = 0.001
    summary = relevance_summary(relevance_table(model, ["0"], groups=2))
    assert summary.loc[0, "small_groups"] == 1
    assert_close(summary.loc[0, "top_share"], 5 / (5 + math.sqrt(2e-6)))
    assert_close(group_weight_norms(model[0].weight, partition_filters(5, 2)), [5.0, math.sqrt(2e-6)])


# -------------------------------------------------------------------------------- analysis bits
def test_within_group_distance_all_pairs():
    psi = torch.sigmoid(torch.randn(2, 7, 3, 3, generator=torch.Generator().manual_seed(0)))
    part = partition_filters(7, groups=2)  # groups {0,1,2}, {3,4,5}, filter 6 free
    got = within_group_distance(psi, part)
    expected = []
    for g in range(2):
        pairs = [(g * 3 + a, g * 3 + b) for a in range(3) for b in range(a + 1, 3)]
        values = [soft_iou_distance(psi[n, i].flatten(), psi[n, j].flatten()) for n in range(2) for i, j in pairs]
        expected.append(torch.stack(values).mean())
    assert_close(got, torch.stack(expected), atol=1e-6)


def test_ratio_of_unique_detectors():
    assert_close(ratio_of_unique_detectors([3, 5], [16, 16]), 0.25)
    with pytest.raises(ValueError, match="exactly the last two"):
        ratio_of_unique_detectors([1, 2, 3], [4, 4, 4])


# ------------------------------------------------------------------------------ model and recipe
def test_two_layer_cnn_shapes_and_names():
    model = TwoLayerCNN(num_classes=3, widths=(8, 16))
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
    assert conv_layers(model) == ["conv1", "conv2"]
    with pytest.raises(ValueError, match="two conv widths"):
        TwoLayerCNN(widths=(8,))


def test_cgl_loss_terms_recipe():
    model = TwoLayerCNN(widths=(10, 20))
    terms = cgl_loss_terms(model, CGLConfig())
    assert [t.name for t in terms] == ["block_norm", "group_activation", "spatial"]
    assert terms[1].layers == ("conv1", "conv2") and terms[0].weight_layers == ("conv1", "conv2")
    assert terms[1].receptive_field is terms[2].receptive_field
    only_bn = cgl_loss_terms(model, CGLConfig(lambda_g=0.0, lambda_s=0.0, block_norm_layers=("conv2",)))
    assert [t.name for t in only_bn] == ["block_norm"] and only_bn[0].weight_layers == ("conv2",)
    assert not any(n.startswith("cgl_") for n, _ in model.named_parameters())


def _cgl_step(model, terms, images, labels):
    layers = sorted({layer for term in terms for layer in term.layers})
    with capture_activations(model, layers, detach=False) as acts:
        task = nn.functional.cross_entropy(model(images), labels)
        penalties = [term(model, acts) for term in terms]
    (task + sum(penalties)).backward()
    return task, penalties


def activation_term_grads(**weights) -> TwoLayerCNN:
    """A TwoLayerCNN (conv2: 2 groups of 3, filter 6 free) after backward of one activation term on conv2."""
    torch.manual_seed(0)
    model = TwoLayerCNN(widths=(4, 7))
    (term,) = cgl_loss_terms(model, CGLConfig(groups=2, lambda_bn=0.0, activation_layers=("conv2",), **weights))
    with capture_activations(model, term.layers, detach=False) as acts:
        model(torch.randn(3, 3, 8, 8))
        term(model, acts).backward()
    return model


def test_group_loss_gradients_skip_free_filters_and_classifier():
    model = activation_term_grads(lambda_s=0.0)
    grad = model.conv2.weight.grad
    assert grad[:6].abs().sum(dim=(1, 2, 3)).min() > 0 and model.conv1.weight.grad.abs().sum() > 0
    assert_close(grad[6], torch.zeros_like(grad[6]), atol=0.0)  # free filter: no L_g gradient
    assert model.classifier.weight.grad is None


def test_spatial_loss_gradients_reach_every_map_but_not_classifier():
    model = activation_term_grads(lambda_g=0.0)
    assert model.conv2.weight.grad.abs().sum(dim=(1, 2, 3)).min() > 0  # free filter included
    assert model.classifier.weight.grad is None


def test_learned_p_registers_parameters_that_get_gradients():
    torch.manual_seed(0)
    model = TwoLayerCNN(widths=(4, 6))
    terms = cgl_loss_terms(model, CGLConfig(groups=2, lambda_bn=0.0, learn_p=True))
    names = [n for n, _ in model.named_parameters()]
    assert "cgl_receptive_field.p1" in names and "cgl_receptive_field.p2" in names
    _cgl_step(model, terms, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert model.cgl_receptive_field.p1.grad is not None and model.cgl_receptive_field.p1.grad != 0


@pytest.mark.parametrize("kernel", ["fused", "eager"])
def test_a_model_trained_with_learned_p_can_be_copied_and_pickled(kernel):
    torch.manual_seed(0)
    model = TwoLayerCNN(widths=(4, 6))
    terms = cgl_loss_terms(model, CGLConfig(groups=2, learn_p=True, kernel=kernel))
    data = TensorDataset(torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,)))
    train(model, data, config=TrainConfig(epochs=1, batch_size=2, lr=0.01, schedule="none"), loss_terms=terms)
    copied = copy.deepcopy(model)  # the field it owns keeps no step's graph once the step's tensors are gone
    pickle.loads(pickle.dumps(model))
    assert torch.equal(copied.cgl_receptive_field.p1, model.cgl_receptive_field.p1)


def test_receptive_field_results_are_reused_for_the_same_tensor_and_freed_after_the_step():
    torch.manual_seed(0)
    model = TwoLayerCNN(widths=(4, 6))
    field = SoftReceptiveField()
    activation = model.conv1(torch.randn(2, 3, 5, 5))
    partition = partition_filters(4, 2)
    statistics = field.statistics(model, "conv1", activation, partition, (1,))
    assert field.statistics(model, "conv1", activation, partition, (1,)) is statistics
    psi = field.of_layer(model, "conv1", activation)
    assert field.of_layer(model, "conv1", activation) is psi
    (statistics.l1.sum() + psi.sum()).backward()
    probes = weakref.ref(statistics), weakref.ref(psi)
    del statistics, psi, activation
    gc.collect()
    assert all(probe() is None for probe in probes)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_regularised_training_in_the_shared_loop(device):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 12, 12), torch.randint(0, 2, (16,)))
    config = TrainConfig(epochs=4, batch_size=8, lr=0.05, weight_decay=1e-4, schedule="none")
    histories = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TwoLayerCNN(widths=(8, 10))
        terms = cgl_loss_terms(model, CGLConfig(groups=2, lambda_bn=1e-2, lambda_g=1.0, lambda_s=1.0))
        histories.append(train(model, data, config=config, loss_terms=terms, device=device).history)
    history = histories[0]
    penalties = history[["loss_block_norm", "loss_group_activation", "loss_spatial"]]
    assert bool((penalties > 0).all().all())
    objective = (history["train_loss"] + penalties.sum(axis=1)).tolist()
    assert objective[-1] < objective[0]
    if device == "cpu":  # bit-identical reruns on CPU
        assert histories[0].drop(columns="seconds").equals(histories[1].drop(columns="seconds"))


# ------------------------------------------------------------------------------ experiment helpers
def test_select_lambda_rule():
    # within 1.5 points of the R_bn-only model: 0.01 and 0.001 -> the largest admissible, 0.01
    assert select_lambda({0.001: 0.80, 0.01: 0.79, 0.1: 0.70}, 0.80, 1.5) == 0.01
    assert select_lambda({0.001: 0.50, 0.01: 0.40}, 0.80, 1.5) == 0.001  # none admissible: the smallest
    with pytest.raises(ValueError, match="at least one"):
        select_lambda({}, 0.8, 1.5)


def test_seeded_subsets_keep_attributes_and_split():
    class Tagged(torch.utils.data.Dataset):
        mask_size = (4, 4)

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"index": i}

    assert seeded_indices(10, None) is None and seeded_indices(10, 10) is None
    chosen = seeded_indices(10, 4, seed=1)
    assert chosen == sorted(chosen) and len(set(chosen)) == 4 and chosen == seeded_indices(10, 4, seed=1)
    subset = seeded_subset(Tagged(), 4, seed=1)
    assert subset.mask_size == (4, 4) and [subset[i]["index"] for i in range(4)] == chosen
    items = InMemoryItems(subset)
    assert items.mask_size == (4, 4) and not hasattr(items, "__getitems__")  # the loader must use our items
    assert [b["index"].tolist() for b in torch.utils.data.DataLoader(items, batch_size=4)] == [chosen]
    kept, held = split_indices(10, 0.2, seed=0)
    assert len(held) == 2 and sorted(kept + held) == list(range(10))


def test_reference_numbers_are_consistent():
    reference = load_reference("03_concept_group_learning")
    for row in reference["table1_synthetic"]["rows"]:
        assert row["color"] + row["shape"] + row["color_shape"] == row["total"]
    for row in reference["table2_unique_detectors"]["rows"]:
        assert sum(row["layers"]) == row["sum"]
    assert {c["id"] for c in reference["claims"]} == {f"G{i}" for i in range(1, 9)}


def test_dissection_tables_stack_the_layers_tables(tmp_path):
    write_tiny_broden(tmp_path, n_images=12, image_size=32)
    broden = InMemoryItems(seeded_subset(BrodenDataset(tmp_path), 10, seed=0))
    torch.manual_seed(0)
    model = TwoLayerCNN(widths=(6, 8))
    config = DissectionConfig(batch_size=4, quantile=0.05, iou_threshold=0.04)
    table, units = dissection_tables(dissect_layers(model, ["conv1", "conv2"], broden, config=config, device="cpu"))
    for layer in ("conv1", "conv2"):
        expected = dissect(model, layer, broden, device="cpu", **config.dissect_keywords())
        got = table[table.layer == layer].drop(columns=["layer", "units"]).reset_index(drop=True)
        assert got.equals(expected.summary), (layer, got, expected.summary)
        got_units = units[units.layer == layer].drop(columns="layer").reset_index(drop=True)
        assert got_units.equals(expected.units[["unit", "label", "category", "iou", "detector"]])
    assert list(table.layer.unique()) == ["conv1", "conv2"] and set(table.units) == {6, 8}


def test_group_purity_known_answer():
    model = TwoLayerCNN(widths=(10, 8))
    with torch.no_grad():  # 5 groups of 2 filters; group 3 has the largest weight norm
        model.conv1.weight.copy_(torch.arange(10).float().div(10).add(1).repeat_interleave(27).view(10, 3, 3, 3))
        model.conv1.weight[6:8] *= 10
    labels = ["red", "red", "red", "sky", "sky", "sky", "dog", "dog", "cat", "cat"]
    detector = [True, True, True, True, False, True, True, True, True, False]
    units = pd.DataFrame({"layer": "conv1", "unit": range(10), "label": labels, "category": "x", "iou": 0.1,
                          "detector": detector})
    table = group_purity(units, model, "conv1", groups=5)
    assert table.detectors.tolist() == [2, 2, 1, 2, 1]
    np.testing.assert_allclose(table.purity, [1.0, 0.5, np.nan, 1.0, np.nan])  # NaN: fewer than 2 detectors
    assert int(table.beta.idxmax()) == 3
    pairs = purity_pairs(table.assign(arch="a", variant="cgl", seed=0))
    assert pairs[["top", "others", "layers"]].values.tolist() == [[1.0, 0.75, 1]]


def test_paper_layers_of_the_torchvision_backbones():
    plain = build_backbone("vgg16", 10, small_input=True, width=0.125)
    assert activation_layers("vgg16", plain) == ("features.21", "features.24", "features.26")  # conv4_3, conv5_1, conv5_2
    assert dissected_layers("vgg16", plain) == ("features.14", "features.21", "features.24", "features.26", "features.28")
    assert [plain.get_submodule(n).out_channels for n in dissected_layers("vgg16", plain)] == [32, 64, 64, 64, 64]
    bn = build_backbone("vgg16_bn", 10, small_input=True, width=0.125)
    assert activation_layers("vgg16_bn", bn) == ("features.31", "features.35", "features.38")  # the BN after each conv
    assert all(isinstance(bn.get_submodule(n), nn.BatchNorm2d) for n in activation_layers("vgg16_bn", bn))
    assert dissected_layers("vgg16_bn", bn) == ("features.20", "features.30", "features.34", "features.37", "features.40")
    alexnet = build_backbone("alexnet", 10, small_input=True, width=0.125)  # every conv, as for any other model
    assert activation_layers("alexnet", alexnet) == dissected_layers("alexnet", alexnet) == tuple(
        f"features.{i}" for i in (0, 3, 6, 8, 10))


# ------------------------------------------------------------------------------ training recipe
SMALL = CGLSettings(synthetic_widths=(10, 20), min_group_size=2)


def test_variant_recipe_key_is_the_cgl_cache_key():
    recipe = VariantRecipe("two_layer_cnn", "block_norm", 2, SMALL, lam=0.1, seed=3, lambda_bn=0.7)
    model_key = {"arch": "two_layer_cnn", "num_classes": 2, "width": 1.0, "small_input": True,
                 "synthetic_widths": (10, 20), "global_pool": "max"}
    assert recipe.key(recipe.build()) == {"model": model_key, "loss": {"variant": "block_norm", "cgl": CGLConfig(
        lambda_bn=0.7, lambda_g=0.0, lambda_s=0.0, activation_layers=("conv1", "conv2"),
        block_norm_layers=("conv1", "conv2"), seed=3)}}
    baseline = VariantRecipe("two_layer_cnn", "weight_decay", 2, SMALL, lam=0.1, seed=3, lambda_bn=0.7)
    assert baseline.key(baseline.build()) == {"model": model_key, "loss": {"variant": "weight_decay", "cgl": None}}
    assert baseline.loss_terms(baseline.build()) == []


def test_only_layers_with_large_enough_groups_are_grouped():
    """conv1 (10 filters) has groups of 2, conv2 (20) of 4: a minimum of 3 leaves conv1 ungrouped, 5 leaves none."""
    settings = dataclasses.replace(SMALL, min_group_size=3)
    model = build_model("two_layer_cnn", 2, settings)
    assert grouped_layers(model, ["conv1", "conv2"], groups=5, min_group_size=3) == ("conv2",)
    config = settings.cgl_config("two_layer_cnn", model, "cgl", 0.1, 0, lambda_bn=1.0)
    assert config.activation_layers == config.block_norm_layers == ("conv2",)
    with pytest.raises(ValueError, match="no layer has 5 groups of >= 5 filters"):
        dataclasses.replace(SMALL, min_group_size=5).cgl_config("two_layer_cnn", model, "block_norm", 0.0, 0, lambda_bn=1.0)
    with pytest.raises(ValueError, match="min_group_size"):
        CGLSettings(min_group_size=1)
    with pytest.raises(ValueError, match="must hold weight_decay and cgl"):
        CGLSettings(main_variants=("weight_decay", "block_norm"))
    with pytest.raises(ValueError, match="main_variants"):
        CGLSettings(main_variants=("weight_decay", "cgl", "l1"))


def test_integrated_lr_sums_the_lr_of_every_step():
    # 10 images, batch 4 -> 3 steps an epoch; step schedule 0.1, 0.1, 0.01 (x0.1 every 2 epochs)
    step = TrainConfig(epochs=3, batch_size=4, lr=0.1, schedule="step", step_size=2)
    assert integrated_lr(step, 10) == pytest.approx(3 * (0.1 + 0.1 + 0.01))
    # cosine over 2 epochs, per epoch: lr * (1 + cos(pi * e / 2)) / 2 = 0.2, 0.1
    assert integrated_lr(TrainConfig(epochs=2, batch_size=5, lr=0.2, schedule="cosine"), 10) == pytest.approx(2 * 0.3)
    assert integrated_lr(TrainConfig(epochs=4, batch_size=10, lr=0.5, schedule="none"), 10) == pytest.approx(2.0)
    # the paper's run: 7,045 steps an epoch, 30 epochs at each of 0.01, 0.001, 0.0001
    assert integrated_lr(PAPER_SCHEDULE, PAPER_TRAIN_IMAGES) == pytest.approx(7045 * 30 * 0.0111)
    with pytest.raises(ValueError, match="at least one training image"):
        integrated_lr(step, 0)


def test_lambda_bn_rule_matches_the_papers_integrated_shrinkage():
    config = TrainConfig(epochs=2, batch_size=5, lr=0.2, schedule="cosine")  # sum of lr 0.6 on 10 images
    integrated = dataclasses.replace(SMALL, lambda_bn_rule="integrated")
    lam = integrated.lambda_bn("alexnet", config, 10)
    assert lam * integrated_lr(config, 10) == pytest.approx(5e-3 * integrated_lr(PAPER_SCHEDULE, PAPER_TRAIN_IMAGES))
    assert integrated.lambda_bn("vgg16_bn", config, 10) == pytest.approx(lam / 5)  # VGG's published 1e-3
    assert dataclasses.replace(SMALL, lambda_bn_rule="paper").lambda_bn("alexnet", config, 10) == 5e-3
    assert dataclasses.replace(integrated, shrinkage_fraction=0.1).lambda_bn("alexnet", config, 10) == pytest.approx(lam / 10)
    budget = shrinkage_budget(integrated, "alexnet", config, 10)
    assert budget["shrinkage"] == pytest.approx(budget["paper_shrinkage"]) and budget["sum_lr"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="lambda_bn_rule"):
        CGLSettings(lambda_bn_rule="scaled")
    with pytest.raises(ValueError, match="shrinkage_fraction"):
        CGLSettings(shrinkage_fraction=0.0)


def test_the_synthetic_cnn_can_match_its_own_share_of_the_shrinkage():
    config = TrainConfig(epochs=2, batch_size=5, lr=0.2, schedule="cosine")
    integrated = dataclasses.replace(SMALL, lambda_bn_rule="integrated", shrinkage_fraction=0.03)
    split = dataclasses.replace(integrated, synthetic_shrinkage_fraction=0.1)
    assert split.lambda_bn("alexnet", config, 10) == integrated.lambda_bn("alexnet", config, 10)
    assert split.lambda_bn("two_layer_cnn", config, 10) == pytest.approx(integrated.lambda_bn("two_layer_cnn", config, 10) * 0.1 / 0.03)
    assert shrinkage_budget(split, "two_layer_cnn", config, 10)["fraction"] == 0.1
    with pytest.raises(ValueError, match="synthetic_shrinkage_fraction"):
        CGLSettings(synthetic_shrinkage_fraction=-1.0)


def test_seed_list_takes_the_first_seeds():
    assert SMALL.seed_list((4, 5, 6), 2) == (4, 5)
    assert dataclasses.replace(SMALL, seeds=(0, 1, 2, 3, 4)).seed_list((4, 5, 6), 5) == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="list more in \\[cgl\\] seeds"):
        SMALL.seed_list((4, 5, 6), 4)


def test_train_variant_builds_its_model_right_after_seeding(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path))
    seen = {}

    def stop(model, train_set, *, loss_terms, config, **kwargs):
        seen.update(state=copy.deepcopy(model.state_dict()), terms=[type(t).__name__ for t in loss_terms],
                    lambda_bn=loss_terms[0].weight, config=config)
        raise KeyboardInterrupt("stopped before training")

    monkeypatch.setattr(loop, "train", stop)
    data = TensorDataset(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    torch.manual_seed(99)  # the state before the call must not matter
    with pytest.raises(KeyboardInterrupt):
        train_variant("two_layer_cnn", "cgl", data, num_classes=2, settings=SMALL, seed=5, lam=0.01, device="cpu")
    runtime.seed_everything(5)  # what train_variant did before train_cached owned the seeding
    expected = build_model("two_layer_cnn", 2, SMALL).state_dict()
    assert seen["state"].keys() == expected.keys() and all(torch.equal(seen["state"][k], expected[k]) for k in expected)
    assert seen["terms"] == ["BlockNorm", "GroupActivationLoss", "SpatialLoss"]
    assert seen["lambda_bn"] == pytest.approx(SMALL.lambda_bn("two_layer_cnn", SMALL.train, 4))  # the rule, on 4 images
    assert seen["config"].weight_decay == SMALL.train.weight_decay  # kept off the block norm's layers only


def test_run_group_statistics_one_row_per_model():
    uniform, one_group = TwoLayerCNN(2, widths=(10, 20)), TwoLayerCNN(2, widths=(10, 20))
    with torch.no_grad():
        for model in (uniform, one_group):
            model.conv1.weight.fill_(0.1)
            model.conv2.weight.fill_(0.1)
        one_group.conv1.weight[2:] = 0  # conv1: only group 0 (filters 0, 1) has weight
    data = TensorDataset(torch.rand(6, 3, 8, 8), torch.zeros(6, dtype=torch.long))
    models = {("two_layer_cnn", "weight_decay", 0): uniform, ("two_layer_cnn", "cgl", 1): one_group}
    table = run_group_statistics(models, data, settings=dataclasses.replace(SMALL, analysis_images=4), quantile=0.1,
                                 batch_size=3, device="cpu")
    assert table[["arch", "variant", "seed"]].values.tolist() == [["two_layer_cnn", "weight_decay", 0], ["two_layer_cnn", "cgl", 1]]
    assert_close(table["top_group_share"].tolist(), [0.2, (1.0 + 0.2) / 2], atol=1e-9)  # equal groups: 1/5
    stats = group_statistics(uniform, ["conv1", "conv2"], data, images=4, batch_size=3, device="cpu", quantile=0.1)
    for column in ("within_group_distance", "spatial_spread", "psi_variance", "mask_iou_within", "top_area"):
        assert table[column][0] == stats[column].mean()
    assert table["mask_iou_gap"][0] == table["mask_iou_within"][0] - table["mask_iou_across"][0]
    # identical filters: identical maps, so the masks of any two units coincide
    assert_close(stats[["mask_iou_within", "mask_iou_across"]].to_numpy(), np.ones((2, 2)), atol=1e-9)


def test_mask_overlap_on_hand_made_maps():
    """Four units over 2 images x 4 positions; each fires (value > 0) at two places, the rest is 0, so the
    top-25% level keeps exactly those two. Groups (0, 1), (2, 3). Unit 1 fires at (image 0, 1), (image 1, 1)."""
    maps = torch.zeros(2, 4, 1, 4)
    maps[0, 0, 0, [0, 1]] = 1.0  # unit 0: image 0, positions 0 and 1
    maps[0, 1, 0, 1], maps[1, 1, 0, 1] = 2.0, 3.0  # unit 1: its strongest image is image 1
    maps[1, 2, 0, [0, 1]] = 1.0  # units 2 and 3: the same two places of image 1
    maps[1, 3, 0, [0, 1]] = 1.0
    found = mask_overlap(maps, partition_filters(4, 2), quantile=0.25, top_images=1)
    assert found["mask_iou_within"] == pytest.approx((1 / 3 + 1) / 2)  # units 0, 1 share 1 of 3 places; 2, 3 all
    assert found["mask_iou_across"] == pytest.approx(2 * (1 / 3) / 4)  # of 4 pairs only (1, 2), (1, 3) overlap, 1 place of 3
    assert found["top_area"] == pytest.approx((0.5 + 0.25 + 0.5 + 0.5) / 4)  # unit 1: one place of 4 in image 1


def test_weight_correlation_within_and_across_groups():
    weight = torch.tensor([[1.0, 2, 3], [2, 4, 6], [3, 2, 1], [6, 4, 2], [5, 0, 5]]).view(5, 1, 1, 3)  # last one free
    within, across = weight_correlation(weight, partition_filters(5, 2))
    assert within == pytest.approx(1.0) and across == pytest.approx(-1.0)


def test_relevance_distributions_and_training_record():
    model = TwoLayerCNN(2, widths=(10, 20))
    with torch.no_grad():
        model.conv1.weight.fill_(0.0)
        model.conv1.weight[:2] = 1.0  # group 0 of conv1: 2 filters x 27 weights of 1 -> beta sqrt(54)
        model.conv2.weight.fill_(0.5)
    settings = dataclasses.replace(SMALL, min_group_size=2)
    table = relevance_distributions({("two_layer_cnn", "cgl", 3): model}, settings)
    conv1 = table[table.layer == "conv1"]
    assert_close(conv1.beta.tolist(), [math.sqrt(54), 0, 0, 0, 0], atol=1e-6)
    assert conv1.of_max.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert_close(table[table.layer == "conv2"].of_max.tolist(), [1.0] * 5, atol=1e-9)
    assert set(zip(table.arch, table.variant, table.seed)) == {("two_layer_cnn", "cgl", 3)}
    history = pd.DataFrame({"epoch": [1, 2], "train_acc": [0.5, 0.9], "val_acc": [0.4, 0.95], "seconds": [30.0, 30.0]})
    record = training_record(TrainedModel("two_layer_cnn", "weight_decay", 3, model, history, None))
    assert record == {"arch": "two_layer_cnn", "variant": "weight_decay", "seed": 3, "epochs": 2, "train_acc": 90.0,
                      "val_acc": 95.0, "plateaued": False, "minutes": 1.0, "lambda_bn": 0.0}
    fig = plot_relevance(table, labels={"cgl": "CGL"})
    assert [ax.get_title() for ax in fig.axes] == ["conv1", "conv2"]


def test_sweep_stops_at_the_first_lambda_out_of_tolerance(monkeypatch):
    """Tuning accuracy per lambda (20 images): R_bn alone 90%, 0.03 -> 90%, 0.3 -> 85% (5 points out), so 3 is
    never trained; 0.3 loses one image of 20, so its paired drop has SE = sd(0 x 19, 1) / sqrt(20)."""
    from replication.methods.concept_groups import experiment
    correct = {0.0: [1] * 18 + [0] * 2, 0.03: [1] * 18 + [0] * 2, 0.3: [1] * 17 + [0] * 3}
    trained = []

    def fake_train(arch, variant, train_set, *, lam, **kwargs):
        trained.append(lam)
        return TrainedModel(arch, variant, 0, nn.Identity(), pd.DataFrame(), None)

    def fake_predict(model, dataset, **kwargs):
        hits = torch.tensor(correct[trained[-1]], dtype=torch.long)
        return torch.ones(20, dtype=torch.long), torch.stack([1 - hits, hits], dim=1).float()

    monkeypatch.setattr(experiment, "train_variant", fake_train)
    monkeypatch.setattr(experiment, "predict", fake_predict)
    data = TensorDataset(torch.zeros(100, 1), torch.zeros(100, dtype=torch.long))
    data.fingerprint = {"test": 1}
    settings = dataclasses.replace(SMALL, lambda_grid=(3.0, 0.03, 0.3), tuning_fraction=0.2)
    table, chosen = experiment.run_sweep(data, settings=settings, num_classes=2, seed=0, batch_size=10)
    assert trained == [0.0, 0.03, 0.3] and chosen == 0.03
    assert table["lambda"].tolist() == [0.0, 0.03, 0.3] and table["chosen"].tolist() == [False, True, False]
    assert_close(table["drop"].tolist(), [0.0, 0.0, 5.0], atol=1e-9)
    assert table["drop_se"].iloc[2] == pytest.approx(100 * np.std([0] * 19 + [1], ddof=1) / math.sqrt(20))
    assert set(table["tuning_images"]) == {20}


def test_fig5_panels_show_the_most_relevant_groups_first_units_top_images_and_their_above_threshold_area():
    from replication.methods.concept_groups.figures import plot_top_activations

    conv = nn.Conv2d(3, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[2, 0] = 3.0  # group 1 (filters 2, 3) has the larger norm: its first filter, 2, reads red
        conv.weight[0, 1] = 1.0  # group 0's first filter reads green
    images = torch.zeros(6, 3, 4, 4)
    for i in range(6):  # image i: a red square of side 1 + i // 2 and a green square of side 3 - i // 2
        images[i, 0, : 1 + i // 2, : 1 + i // 2] = 1.0 + 0.1 * i
        images[i, 1, 3 - (3 - i // 2):, 3 - (3 - i // 2):] = 1.0 + 0.1 * (5 - i)
    dataset = TensorDataset(images, torch.zeros(6, dtype=torch.long))
    fig = plot_top_activations({"net": nn.Sequential(conv)}, "0", dataset, images=6, groups=2, units=2, top_k=2,
                               quantile=0.1, mean=(0, 0, 0), std=(1, 1, 1), batch_size=4, device="cpu")
    rows = np.array(fig.axes).reshape(2, 2)
    assert rows[0, 0].get_ylabel() == "net\nunit 2 (group 1)" and rows[1, 0].get_ylabel() == "net\nunit 0 (group 0)"
    # T_k is the top 10% of 96 red values: above it only the brightest red pixels (images 5 and 4)
    red = (images[:, 0] * 3.0).flatten()
    level = torch.quantile(red, 0.9, interpolation="linear").item()
    expected = [float((images[i, 0] * 3.0 > level).float().mean()) for i in (5, 4)]
    assert [ax.get_xlabel() for ax in rows[0]] == [f"area {a:.2f}" for a in expected]
    plt.close(fig)

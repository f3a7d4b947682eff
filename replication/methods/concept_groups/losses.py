"""CGL's three regularisers as loss terms for the shared training loop, and `cgl_loss_terms` to build them.

- the **group activation loss** L_g pulls the soft receptive fields psi of filters of the same group
  together (soft-IoU distance over random within-group pairs, redrawn every step);
- the **spatial loss** L_s makes every soft map compact around its centre of mass;
- the **block norm** R_bn = sum_l sum_g ||w_gl||_F (an l2,1 group sparsity over filter groups)
  replaces weight decay on the conv weights it regularises.

Each term follows the loop's `LossTerm` contract: `name`, `layers` (modules whose outputs it needs;
the pre-activation conv outputs, or the BN outputs for the batch-norm form of psi), `__call__(model,
activations)` returning a scalar already multiplied by its weight, and for the block norm
`decay_free_parameters`. Everything is vectorised over filters, groups and pairs; the only Python
loops run over the (few) layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from replication.methods.concept_groups.groups import GROUPS, group_weight_norms, partition_filters
from replication.methods.concept_groups.receptive_field import (
    SPATIAL_EPS,
    STD_EPS,
    MapStatistics,
    SoftReceptiveField,
    check_choice,
    distance_from_l1,
    soft_iou_distance,
)
from replication.models.anatomy import conv_layers

PAIRS_PER_FILTER = 3  # r = 3 * N_g random pairs per group and step [P][C]
PAIR_SAMPLINGS = ("shift", "uniform")  # cyclic shifts, fused [I] | independent uniform pairs [C]
LG_REDUCTIONS = ("sample", "batch")  # per-sample L1 over space [C] | L1 over batch and space [P]
LAYER_REDUCTIONS = ("mean", "sum")  # average over layers [C] | sum over layers (eq. 5) [P]


def _pair_distance(
    first: torch.Tensor, second: torch.Tensor, i: torch.Tensor, j: torch.Tensor, reduction: str
) -> torch.Tensor:
    """Mean D over pairs (i[k] of `first`, j[k] of `second`), summed over groups.

    `first`, `second`: (N, G, f, P) grouped soft maps with P flattened positions. "sample" takes the
    L1 norms per sample over positions and averages over the batch [C]; "batch" takes them over batch
    and positions together [P].
    """
    a, b = first[:, :, i], second[:, :, j]  # (N, G, r, P)
    dims = (-1,) if reduction == "sample" else (0, -1)
    return soft_iou_distance(a, b, dims).mean(dim=(0, -1) if reduction == "sample" else -1).sum()


def _shifted_pair_distance(statistics: MapStatistics, reduction: str) -> torch.Tensor:
    """Mean D over the pairs (i, (i + s) mod N_g) for every grouped filter i and shift s, summed over groups."""
    l1, mass, shifts = statistics.l1, statistics.mass, statistics.shifts
    partner = torch.stack([mass.roll(-s, dims=-1) for s in shifts], dim=2)  # (N, G, k, N_g)
    mass = mass[:, :, None]
    if reduction == "batch":
        l1, mass, partner = l1.sum(0), mass.sum(0), partner.sum(0)
    distance = distance_from_l1(l1, mass, partner).mean(dim=(-2, -1))  # (N, G) or (G,)
    return distance.sum(-1).mean() if reduction == "sample" else distance.sum()


def _reduce_layers(values: list[torch.Tensor], layer_reduction: str) -> torch.Tensor:
    total = torch.stack(values).sum()
    return total / len(values) if layer_reduction == "mean" else total


def _check_layers(layers: Sequence[str], term: str) -> tuple[str, ...]:
    layers = tuple(layers)
    if not layers:
        raise ValueError(f"{term} needs at least one layer; pass conv (or BN) module names, e.g. anatomy.conv_layers(model).")
    return layers


class GroupActivationLoss:
    """L_g: soft-IoU distance between psi maps of random filter pairs within each group [P eq. 5].

    Per step and layer, r = `pairs_per_filter` * N_g ordered pairs (i != j) are drawn and shared by
    all groups of the layer [C]; D is averaged over pairs (and the batch), summed over groups,
    reduced over layers (mean [C] or sum [P]) and multiplied by `weight` (lambda_g).

    `pair_sampling`: "uniform" draws every pair independently and uniformly, as the code does [C];
    "shift" (default [I]) draws `pairs_per_filter` shifts s uniform in 1..N_g-1 and pairs every
    filter i with (i + s) mod N_g. Both give the same r pairs per group and an unbiased estimate of
    the mean over all pairs (for each i the partner is uniform over the others); "shift" pairs every
    filter equally often and runs as contiguous slices with a fused backward, which keeps CGL within
    its cost budget.

    The draws come from a generator owned by the term, seeded from (`seed`, torch's current global
    seed) and re-seeded whenever the global seed changes (the code's pairs were unseeded [C]), so the
    training loop, which re-seeds torch every epoch, draws the same pairs in a resumed run as in an
    uninterrupted one.

    `cross_layer_weight` (lambda_2) adds the paper's sliding term D(psi^l_jg, psi^{l+1}_ig) between
    consecutive listed layers, with uniform pairs and psi^{l+1} resized bilinearly to layer l's grid
    [I]; the paper set it to 0 in every experiment [P].
    """

    name = "group_activation"
    clone_captured = True  # the training loop's contract; cgl_loss_terms clears it where nothing is in place

    def __init__(
        self,
        layers: Sequence[str],
        *,
        weight: float,
        groups: int = GROUPS,
        free_filters: int | None = None,
        pairs_per_filter: int = PAIRS_PER_FILTER,
        pair_sampling: str = "shift",
        reduction: str = "sample",
        layer_reduction: str = "mean",
        cross_layer_weight: float = 0.0,
        receptive_field: SoftReceptiveField | None = None,
        seed: int = 0,
    ):
        check_choice(pair_sampling, PAIR_SAMPLINGS, "pair_sampling")
        check_choice(reduction, LG_REDUCTIONS, "reduction")
        check_choice(layer_reduction, LAYER_REDUCTIONS, "layer_reduction")
        if pairs_per_filter < 1:
            raise ValueError(f"pairs_per_filter must be >= 1, got {pairs_per_filter}; the paper uses {PAIRS_PER_FILTER}.")
        self.layers = _check_layers(layers, "GroupActivationLoss")
        if cross_layer_weight and len(self.layers) < 2:
            raise ValueError("cross_layer_weight > 0 needs at least two layers (consecutive pairs are compared).")
        self.weight = weight
        self.groups = groups
        self.free_filters = free_filters
        self.pairs_per_filter = pairs_per_filter
        self.pair_sampling = pair_sampling
        self.reduction = reduction
        self.layer_reduction = layer_reduction
        self.cross_layer_weight = cross_layer_weight
        self.receptive_field = receptive_field or SoftReceptiveField()
        self.seed = seed
        self.generator = torch.Generator()
        self._global_seed: int | None = None

    def _generator(self) -> torch.Generator:
        global_seed = torch.initial_seed()
        if global_seed != self._global_seed:
            self._global_seed = global_seed
            self.generator.manual_seed(int(np.random.SeedSequence([self.seed, global_seed]).generate_state(1)[0]))
        return self.generator

    def _pairs(self, count: int, size_i: int, size_j: int, distinct: bool, device: torch.device):
        """`count` uniform random index pairs, i in [0, size_i), j in [0, size_j); i != j when `distinct`."""
        generator = self._generator()
        i = torch.randint(size_i, (count,), generator=generator)
        if distinct:  # j uniform over the other size_i - 1 indices
            j = (i + torch.randint(1, size_i, (count,), generator=generator)) % size_i
        else:
            j = torch.randint(size_j, (count,), generator=generator)
        return i.to(device), j.to(device)

    def _shifts(self, size: int) -> tuple[int, ...]:
        return tuple(torch.randint(1, size, (self.pairs_per_filter,), generator=self._generator()).tolist())

    def __call__(self, model: nn.Module, activations: dict[str, torch.Tensor]) -> torch.Tensor:
        field = self.receptive_field
        within = []
        for layer in self.layers:
            activation = activations[layer]
            partition = partition_filters(activation.shape[1], self.groups, self.free_filters, min_size=2)
            size = partition.group_size
            if self.pair_sampling == "shift":
                statistics = field.statistics(model, layer, activation, partition, self._shifts(size))
                within.append(_shifted_pair_distance(statistics, self.reduction))
            else:
                i, j = self._pairs(self.pairs_per_filter * size, size, size, True, activation.device)
                flat = partition.split(field.of_layer(model, layer, activation), dim=1).flatten(3)
                within.append(_pair_distance(flat, flat, i, j, self.reduction))
        loss = _reduce_layers(within, self.layer_reduction)
        if self.cross_layer_weight:
            grouped = []
            for layer in self.layers:
                psi = field.of_layer(model, layer, activations[layer])
                grouped.append(partition_filters(psi.shape[1], self.groups, self.free_filters, min_size=2).split(psi, dim=1))  # (N, G, f, H, W)
            loss = loss + self.cross_layer_weight * self._cross_layer(grouped)
        return self.weight * loss

    def _cross_layer(self, grouped: list[torch.Tensor]) -> torch.Tensor:
        terms = []
        for lower, upper in zip(grouped, grouped[1:]):
            n, g, f_low, h, w = lower.shape
            f_up = upper.shape[2]
            upper = F.interpolate(upper.flatten(1, 2), size=(h, w), mode="bilinear", align_corners=False)
            upper = upper.reshape(n, g, f_up, h * w)
            j, i = self._pairs(self.pairs_per_filter * f_low, f_low, f_up, False, lower.device)
            terms.append(_pair_distance(lower.flatten(3), upper, j, i, self.reduction))
        return _reduce_layers(terms, self.layer_reduction)


class SpatialLoss:
    """lambda_s * L_s: mean compactness of every psi map of the listed layers [P eq. 6][C].

    Averaged over batch and channels per layer, then over layers (mean [C] or sum [P]).
    """

    name = "spatial"
    clone_captured = True  # as GroupActivationLoss

    def __init__(
        self,
        layers: Sequence[str],
        *,
        weight: float,
        eps: float = SPATIAL_EPS,
        normalise_coordinates: bool = False,
        layer_reduction: str = "mean",
        receptive_field: SoftReceptiveField | None = None,
    ):
        check_choice(layer_reduction, LAYER_REDUCTIONS, "layer_reduction")
        self.layers = _check_layers(layers, "SpatialLoss")
        self.weight = weight
        self.eps = eps
        self.normalise_coordinates = normalise_coordinates
        self.layer_reduction = layer_reduction
        self.receptive_field = receptive_field or SoftReceptiveField()
        self.receptive_field.register_spread(self.layers, eps, normalise_coordinates)

    def __call__(self, model: nn.Module, activations: dict[str, torch.Tensor]) -> torch.Tensor:
        per_layer = [self.receptive_field.statistics(model, layer, activations[layer]).spread.mean() for layer in self.layers]
        return self.weight * _reduce_layers(per_layer, self.layer_reduction)


class BlockNorm:
    """lambda_bn * R_bn, R_bn = sum_l sum_g ||w_gl||_F over the listed conv layers [P eq. 7][C].

    Free filters are not regularised [C]; a layer narrower than G has only free filters. A non-finite value is replaced by 0, as the code's NaN
    guard does [C] (without a host sync). The regularised weights get no weight decay
    (`decay_free_parameters`): the block norm replaces it [P].
    """

    name = "block_norm"
    layers: tuple[str, ...] = ()  # reads weights, not activations

    def __init__(self, weight_layers: Sequence[str], *, weight: float, groups: int = GROUPS, free_filters: int | None = None):
        self.weight_layers = _check_layers(weight_layers, "BlockNorm")
        self.weight = weight
        self.groups = groups
        self.free_filters = free_filters

    def _weights(self, model: nn.Module) -> list[nn.Parameter]:
        return [model.get_submodule(layer).weight for layer in self.weight_layers]

    def relevance(self, model: nn.Module) -> list[torch.Tensor]:
        """beta_gl for every listed layer (one length-G tensor per layer)."""
        return [  # a layer with fewer filters than groups has empty groups and adds 0, as in the code [C]
            group_weight_norms(w, partition_filters(w.shape[0], self.groups, self.free_filters, min_size=0))
            for w in self._weights(model)
        ]

    def __call__(self, model: nn.Module, activations: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.stack([beta.sum() for beta in self.relevance(model)]).sum()
        return self.weight * torch.where(torch.isfinite(total), total, torch.zeros_like(total))

    def decay_free_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self._weights(model)


@dataclass(frozen=True)
class CGLConfig:
    """The CGL regularisers' hyper-parameters, each with the spec's default and source.

    lambda_bn 5e-3 is the code's AlexNet value (1e-3 for VGG16) [C]; lambda_g, lambda_s are not
    reported [U] (the notebook sweeps them); lambda_2 = 0 [P]. `activation_layers=None` puts L_g and
    L_s on every conv layer [I, spec section 9.2]; `block_norm_layers=None` puts R_bn on every conv
    layer [C]. `seed` seeds the pair sampling. `kernel` chooses how psi, L_g and L_s are computed
    (`SoftReceptiveField`): fused CPU kernels or eager PyTorch, the same values up to float rounding [I].
    """

    groups: int = GROUPS
    free_filters: int | None = None
    lambda_bn: float = 5e-3
    lambda_g: float = 1e-2
    lambda_s: float = 1e-2
    lambda_2: float = 0.0
    pairs_per_filter: int = PAIRS_PER_FILTER
    pair_sampling: str = "shift"
    lg_reduction: str = "sample"
    layer_reduction: str = "mean"
    learn_p: bool = False
    p1: float = 1.0
    p2: float = 0.0
    std_eps: float = STD_EPS
    spatial_eps: float = SPATIAL_EPS
    normalise_coordinates: bool = False
    activation_layers: tuple[str, ...] | None = None
    block_norm_layers: tuple[str, ...] | None = None
    seed: int = 0
    kernel: str = "auto"


RECEPTIVE_FIELD_MODULE = "cgl_receptive_field"


def cgl_loss_terms(model: nn.Module, config: CGLConfig = CGLConfig()) -> list:
    """The loss terms of `config` with a non-zero weight: block norm, group activation, spatial.

    With `config.learn_p`, the shared soft-receptive-field module (P1, P2) is registered in `model`
    as `cgl_receptive_field` so the optimiser trains it with the network. When `model` has no in-place
    module (such as ReLU(inplace=True)), L_g and L_s read the captured outputs without copies; an
    in-place op in a model's own forward code is still caught (the terms check tensor versions).
    """
    convs = conv_layers(model)
    activation_layers = tuple(config.activation_layers or convs)
    block_layers = tuple(config.block_norm_layers or convs)
    receptive_field = SoftReceptiveField(config.p1, config.p2, learn=config.learn_p, std_eps=config.std_eps, kernel=config.kernel)
    if config.learn_p:
        model.add_module(RECEPTIVE_FIELD_MODULE, receptive_field)
    terms: list = []
    if config.lambda_bn:
        terms.append(BlockNorm(block_layers, weight=config.lambda_bn, groups=config.groups, free_filters=config.free_filters))
    if config.lambda_g:
        terms.append(
            GroupActivationLoss(
                activation_layers,
                weight=config.lambda_g,
                groups=config.groups,
                free_filters=config.free_filters,
                pairs_per_filter=config.pairs_per_filter,
                pair_sampling=config.pair_sampling,
                reduction=config.lg_reduction,
                layer_reduction=config.layer_reduction,
                cross_layer_weight=config.lambda_2,
                receptive_field=receptive_field,
                seed=config.seed,
            )
        )
    if config.lambda_s:
        terms.append(
            SpatialLoss(
                activation_layers,
                weight=config.lambda_s,
                eps=config.spatial_eps,
                normalise_coordinates=config.normalise_coordinates,
                layer_reduction=config.layer_reduction,
                receptive_field=receptive_field,
            )
        )
    in_place = any(getattr(module, "inplace", False) for module in model.modules())
    for term in terms:
        if hasattr(term, "clone_captured"):
            term.clone_captured = in_place
    return terms

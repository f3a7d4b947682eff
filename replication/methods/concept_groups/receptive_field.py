"""The soft receptive field psi of every map of a layer, and the distances and spreads taken of it.

psi = sigmoid(P1 * tau + P2) [P]. `SoftReceptiveField` computes it, and what L_g and L_s need of it
(`MapStatistics`), once per step and layer, either with the fused CPU kernels (`soft_map_kernels`)
or with the eager autograd functions (`eager_kernels`). The constants and `check_choice` live here
because both the loss terms and the experiment import this module (and it imports neither).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from replication.methods.concept_groups.eager_kernels import GroupShiftL1, SpatialSpread, StdSoftMap, map_coordinates
from replication.methods.concept_groups.groups import GroupPartition
from replication.methods.concept_groups.soft_map_kernels import GradientBuffer, SoftMapStatistics

STD_EPS = 5e-3  # added to the per-channel std in psi [C]
SPATIAL_EPS = 1e-4  # added to the mass in L_s [C]
KERNELS = ("auto", "fused", "eager")  # auto: the fused numba kernels on the CPU, eager PyTorch elsewhere [I]


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    """Raise a ValueError naming `what` and the allowed `choices` unless `value` is one of them."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}.")


@dataclass(frozen=True)
class MapStatistics:
    """What L_g and L_s need of one layer's psi maps in one step.

    l1 (N, G, k, N_g): L1 distance between filter i and filter (i + s) mod N_g of its group for each
    of the k `shifts`; mass (N, G, N_g): sum of psi of every grouped filter; spread (N, C): L_s of
    every map, or None when no spatial loss asked for this layer.
    """

    l1: torch.Tensor
    mass: torch.Tensor
    spread: torch.Tensor | None
    partition: GroupPartition | None
    shifts: tuple[int, ...]

    def serves(self, partition: GroupPartition | None, shifts: tuple[int, ...]) -> bool:
        return not shifts or (self.partition == partition and self.shifts == shifts)


class _LatestPerTensor:
    """Per key, the value last computed from a tensor, kept only while that tensor lives.

    SoftReceptiveField's per-step results (psi, MapStatistics) hold autograd graphs; kept strongly,
    the last step's would stay with a model that owns the field (learned P1, P2) after training and
    make it impossible to deep-copy. Copies and pickles start empty: this is scratch, not state.
    """

    def __init__(self):
        self._entries: dict = {}

    def get(self, key: str, tensor: torch.Tensor):
        entry = self._entries.get(key)
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def put(self, key: str, tensor: torch.Tensor, value) -> None:
        entries = self._entries

        def forget(reference):
            if key in entries and entries[key][0] is reference:
                del entries[key]

        entries[key] = (weakref.ref(tensor, forget), value)

    def __reduce__(self):
        return type(self), ()


class SoftReceptiveField(nn.Module):
    """psi = sigmoid(P1 * tau + P2), the soft receptive field of every map of a layer [P].

    Without batch-norm tau = a / (std + eps), with `a` the pre-activation conv output and std the
    per-channel standard deviation over batch and positions (not mean-centred) [P][C]. With
    batch-norm, pass the BN module's output `y` and its `bn`: the paper's tau = a_hat + beta/gamma
    (BN's affine transform undone) equals y / gamma [P]; the code's broken BN path is not reproduced.
    P1, P2 are fixed at 1, 0 as in the code [C]; `learn=True` makes them parameters as the paper
    says [P] (they must then be registered in the model so the optimiser sees them).

    L_g and L_s share this module. `statistics` gives them what they need of a layer (`MapStatistics`)
    from one computation per step: the first request computes the shift distances it asks for and the
    spread of every layer a `SpatialLoss` registered (`register_spread`), and later requests for the
    very same, unmodified activation tensor are served from it. `kernel`: "fused" computes them with
    the numba kernels of `soft_map_kernels` (CPU only; psi is never stored; the regularisers take 4-6x
    less time per step than eager), "eager" with PyTorch ops on a stored psi (any device; the
    reference), "auto" (default) fused on the CPU and eager elsewhere [I]. `of_layer` gives psi
    itself (eager), for the other options of L_g.
    """

    def __init__(self, p1: float = 1.0, p2: float = 0.0, *, learn: bool = False, std_eps: float = STD_EPS, kernel: str = "auto"):
        super().__init__()
        check_choice(kernel, KERNELS, "kernel")
        self.learn = learn
        self.std_eps = std_eps
        self.kernel = kernel
        self._spread_settings: dict[str, tuple[float, bool]] = {}
        self._latest_psi = _LatestPerTensor()
        self._latest_statistics = _LatestPerTensor()
        self._gradient_buffers: dict[str, GradientBuffer] = {}
        for name, value in (("p1", p1), ("p2", p2)):
            tensor = torch.tensor(float(value))
            if learn:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def forward(self, activation: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm | None = None) -> torch.Tensor:
        activation = self._float_maps(activation)
        p1, p2 = self.p1.to(activation.device), self.p2.to(activation.device)
        if bn is None:
            return StdSoftMap.apply(activation, p1, p2, self.std_eps)
        return torch.sigmoid(torch.addcmul(p2, activation, (p1 / _bn_gamma(bn, activation)).view(1, -1, 1, 1)))

    @staticmethod
    def _float_maps(activation: torch.Tensor) -> torch.Tensor:
        if activation.dim() != 4:
            raise ValueError(f"psi needs N x C x H x W maps, got shape {tuple(activation.shape)}; hook a conv or BN module.")
        return activation.float()

    @staticmethod
    def _check_unmodified(layer: str, activation: torch.Tensor) -> None:
        if activation._version:  # bumped by an in-place op after the hook captured the tensor
            raise RuntimeError(
                f"the captured output of {layer!r} was modified in place after the forward hook (an in-place "
                f"op such as ReLU(inplace=True) follows it); capture with clone=True or make that op non-inplace."
            )

    @staticmethod
    def _bn_of(model: nn.Module, layer: str) -> nn.modules.batchnorm._BatchNorm | None:
        module = model.get_submodule(layer)
        return module if isinstance(module, nn.modules.batchnorm._BatchNorm) else None

    def of_layer(self, model: nn.Module, layer: str, activation: torch.Tensor) -> torch.Tensor:
        """psi of the captured output of module `layer`: the BN form when that module is a batch-norm."""
        self._check_unmodified(layer, activation)
        psi = self._latest_psi.get(layer, activation)
        if psi is None:
            psi = self(activation, self._bn_of(model, layer))
            self._latest_psi.put(layer, activation, psi)
        return psi

    def register_spread(self, layers: Sequence[str], eps: float, normalise_coordinates: bool) -> None:
        """Have `statistics` compute L_s of `layers` with these settings (a SpatialLoss calls this)."""
        for layer in layers:
            settings = self._spread_settings.setdefault(layer, (eps, normalise_coordinates))
            if settings != (eps, normalise_coordinates):
                raise ValueError(f"layer {layer!r} already has a spatial loss with (eps, normalise_coordinates) = {settings}; "
                                 f"spatial losses sharing a receptive field must agree.")

    def statistics(self, model: nn.Module, layer: str, activation: torch.Tensor, partition: GroupPartition | None = None,
                   shifts: tuple[int, ...] = ()) -> MapStatistics:
        """MapStatistics of module `layer`'s captured output: shift distances over `partition`'s groups
        (when `shifts` are given) and the registered spread, computed once per activation tensor."""
        self._check_unmodified(layer, activation)
        latest = self._latest_statistics.get(layer, activation)
        if latest is not None and latest.serves(partition, shifts):
            return latest
        spread_settings = self._spread_settings.get(layer)
        bn = self._bn_of(model, layer)
        groups, size = (partition.groups, partition.group_size) if shifts else (0, 0)
        if self._fused(activation):
            maps = self._float_maps(activation)
            n, c, h, w = maps.shape
            p1, p2 = self.p1.to(maps.device), self.p2.to(maps.device)
            scale = p1.expand(c) if bn is None else p1 / _bn_gamma(bn, maps)
            coordinates = None if spread_settings is None else map_coordinates(h, w, maps, spread_settings[1])
            l1, mass, spread = SoftMapStatistics.apply(maps, scale, p2, bn is None, self.std_eps, groups, size, shifts,
                                                       coordinates, spread_settings[0] if spread_settings else 0.0,
                                                       self._gradient_buffers.setdefault(layer, GradientBuffer()))
            mass = mass[:, : groups * size].reshape(n, groups, size)
            spread = spread if spread_settings else None
        else:
            psi = self.of_layer(model, layer, activation)
            l1, mass = GroupShiftL1.apply(psi.flatten(2).contiguous(), groups, size, shifts) if shifts else (None, None)
            spread = None if spread_settings is None else spatial_spread(psi, eps=spread_settings[0], normalise_coordinates=spread_settings[1])
        statistics = MapStatistics(l1, mass, spread, partition if shifts else None, tuple(shifts))
        self._latest_statistics.put(layer, activation, statistics)
        return statistics

    def _fused(self, activation: torch.Tensor) -> bool:
        if self.kernel == "fused" and activation.device.type != "cpu":
            raise ValueError(f"kernel='fused' runs on the CPU only, the activation is on {activation.device}; use 'auto' or 'eager'.")
        return self.kernel == "fused" or (self.kernel == "auto" and activation.device.type == "cpu")


def _bn_gamma(bn: nn.modules.batchnorm._BatchNorm, activation: torch.Tensor) -> torch.Tensor:
    return bn.weight.float() if bn.weight is not None else torch.ones(activation.shape[1], device=activation.device)


def soft_iou_distance(psi1: torch.Tensor, psi2: torch.Tensor, dim: int | Sequence[int] = -1) -> torch.Tensor:
    """D = 2|psi1 - psi2|_1 / (|psi1|_1 + |psi2|_1 + |psi1 - psi2|_1) over `dim`, for psi >= 0 [P].

    Equals 1 - IoU for indicator vectors; 0 iff psi1 = psi2; 0/0 (both zero) is defined as 0.
    """
    return distance_from_l1((psi1 - psi2).abs().sum(dim), psi1.sum(dim), psi2.sum(dim))


def distance_from_l1(l1: torch.Tensor, mass1: torch.Tensor, mass2: torch.Tensor) -> torch.Tensor:
    denom = mass1 + mass2 + l1
    return 2 * l1 / denom.clamp_min(torch.finfo(denom.dtype).tiny)


def spatial_spread(psi: torch.Tensor, *, eps: float = SPATIAL_EPS, normalise_coordinates: bool = False) -> torch.Tensor:
    """L_s per map: the psi-weighted mean distance of positions from psi's centre of mass [P eq. 6].

    `psi`: (N, C, H, W) -> (N, C). Coordinates are raw feature-map indices [C], or scaled to [0, 1]
    with `normalise_coordinates` [I]; `eps` is added to the mass in both denominators [C].
    """
    ys, xs = map_coordinates(psi.shape[2], psi.shape[3], psi, normalise_coordinates)
    return SpatialSpread.apply(psi, ys, xs, eps)

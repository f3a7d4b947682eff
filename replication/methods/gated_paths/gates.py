"""NAD's gates: where they sit in a network and how they multiply its channels.

- placement: `gate_locations` (official locations for VGG16 / ResNet-50 / DenseNet-121, and the same
  rules for any torchvision plain / residual / dense network, read from its `models.anatomy`; for timm's
  EfficientNets, family "nas", a replication decision modelled on the official DARTS gates);
- gating: the `gated` context manager (forward hooks, always removed) with per-sample gate rows, so
  one forward can carry (class, image) pairs of many classes; `gate_values` turns logits into gates.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from replication.models.anatomy import Anatomy, anatomy_of
from replication.models.hooks import get_module
from replication.models.surgery import eval_mode
from replication.runtime import resolve_device

GATE_FUNCTIONS = ("sigmoid", "straight_through")


@dataclass(frozen=True)
class GateLocation:
    """One gate: the module whose output it multiplies, its channel count and spatial size.

    `relu_after`: the official gate sits after a *functional* ReLU that follows this module (DenseNet's
    norm5). The hook gates the module output (ReLU commutes with a non-negative gate) and records
    ReLU(gated output), which is what the official code compares and visualises.
    """

    name: str
    channels: int
    height: int
    width: int
    relu_after: bool = False


def _plain_gates(model: nn.Module, body: Anatomy) -> list[tuple[str, bool]]:
    # Official VGG16: a gate after every ReLU or max-pool that feeds a conv (conv_k_1 .. of each block
    # and each pool; a pool that `build_backbone(small_input=True)` replaced by nn.Identity keeps its
    # gate), and the last one after pool5 + AdaptiveAvgPool(7). At 224 px that pool is an identity on
    # pool5's 7x7 output, and a channel gate commutes with average pooling, so we gate pool5 itself:
    # the same sub-network, and a true spatial map at any input size (a 1x1 or duplicated 7x7 copy
    # after the adaptive pool would not localise anything in a mosaic) [I]. In a plain network the
    # module registered just before a conv is the one feeding it.
    order = [name for name, _ in model.named_modules()]
    feeding = [order[order.index(conv) - 1] for conv in list(body.convs.values())[1:]]
    return [(name, False) for name in feeding] + [(body.features, False)]


def _residual_gates(model: nn.Module, body: Anatomy) -> list[tuple[str, bool]]:
    # Official ResNet-50: after the stem max-pool and after every block's final ReLU.
    return [(body.stem, False)] + [(name, False) for name in body.blocks]


def _dense_gates(model: nn.Module, body: Anatomy) -> list[tuple[str, bool]]:
    # Official DenseNet-121: pool0, every dense block but the last, every transition, norm5 + ReLU.
    blocks = [name for name in body.blocks if name != body.stages[-1]]
    return [(body.stem, False)] + [(name, False) for name in blocks] + [(body.features, True)]


def _nas_gates(model: nn.Module, body: Anatomy) -> list[tuple[str, bool]]:
    """EfficientNet (NAS-derived, no official placement) [I]: the stem (`bn1`), every MBConv block
    (`blocks.i.j`) and the head (`bn2`, conv_head's BN + ReLU6): 18 gates on Lite0, 3,120 units.

    Modelled on the official DARTS-V2 gates (after each stem, after every cell) and ResNet-50 gates
    (after the stem, after every block): a NAS network's repeated unit is its cell, here the MBConv
    block. Like a DARTS cell's output (a concatenation of sums of operations, none ending in an
    activation), a block output is linear (MBConv ends in BN, and the skip is added without one). The
    head gate makes the last gate the feature map the classifier pools, as in all four official
    networks (DARTS's last cell, ResNet's last block, DenseNet's norm5 + ReLU, VGG's pool5). `bn1` and
    `bn2` are timm `BatchNormAct2d` modules, which apply ReLU6 themselves: the gate multiplies the
    activated output (as ResNet's stem gate follows ReLU and max-pool), so `relu_after` stays False.
    """
    return [(body.stem, False)] + [(name, False) for name in body.blocks] + [(body.features, False)]


_PLACEMENT = {"plain": _plain_gates, "residual": _residual_gates, "dense": _dense_gates, "nas": _nas_gates}


def gate_locations(model: nn.Module, image_shape: Sequence[int] = (3, 224, 224), *,
                   device: str | torch.device | None = "cpu") -> list[GateLocation]:
    """The gate locations of `model` (official, or its family's rule: `_PLACEMENT`), with channels and
    spatial sizes from one dummy forward."""
    body = anatomy_of(model)
    if body.family not in _PLACEMENT:
        raise ValueError(f"no NAD gate placement for connection family {body.family!r}; known: "
                         f"{', '.join(sorted(_PLACEMENT))} (add a rule to gated_paths.gates._PLACEMENT)")
    placed = _PLACEMENT[body.family](model, body)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [get_module(model, name).register_forward_hook(
        lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))) for name, _ in placed]
    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else resolve_device(device)
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *image_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return [GateLocation(name, shapes[name][1], shapes[name][2], shapes[name][3], relu_after)
            for name, relu_after in placed]


class GateHooks:
    """State of the installed gates: which gate values apply to which sample, and the last outputs.

    `set(values, rows)`: `values[l]` is a (K, C_l) tensor of gate values (K gate sets, e.g. classes);
    sample i of the next forward uses row `rows[i]`; `rows=None` needs K == 1 (one set for all).
    `values=None` leaves the network untouched (the original network). After each forward,
    `outputs[name]` holds the (gated) output at every location (ReLU applied where `relu_after`).
    """

    def __init__(self, locations: Sequence[GateLocation]):
        self.locations = list(locations)
        self.values: Sequence[torch.Tensor] | None = None
        self.rows: torch.Tensor | None = None
        self.outputs: dict[str, torch.Tensor] = {}

    def set(self, values: Sequence[torch.Tensor] | None, rows: torch.Tensor | None = None) -> None:
        if values is not None:
            if len(values) != len(self.locations):
                raise ValueError(f"got {len(values)} gate tensors for {len(self.locations)} gate locations")
            if rows is None and any(v.shape[0] != 1 for v in values):
                raise ValueError("several gate rows given but no `rows` saying which sample uses which row")
        self.values, self.rows = values, rows

    def hook(self, index: int):
        location = self.locations[index]

        def apply(_module: nn.Module, _inputs, output: torch.Tensor):
            gated = output
            if self.values is not None:
                gate = self.values[index] if self.rows is None else self.values[index][self.rows]
                gated = output * gate[:, :, None, None]
            self.outputs[location.name] = F.relu(gated) if location.relu_after else gated
            return gated if self.values is not None else None

        return apply


@contextlib.contextmanager
def gated(model: nn.Module, locations: Sequence[GateLocation]) -> Iterator[GateHooks]:
    """Install in-line channel gates at `locations`; yields the `GateHooks`; hooks removed on exit."""
    state = GateHooks(locations)
    handles = []
    try:
        for index, location in enumerate(state.locations):
            handles.append(get_module(model, location.name).register_forward_hook(state.hook(index)))
        yield state
    finally:
        for handle in handles:
            handle.remove()


def gate_values(logits: torch.Tensor, function: str = "sigmoid") -> torch.Tensor:
    """Gate values from logits: sigmoid (official search), straight-through hard gates, or 'hard' (0/1)."""
    if function == "sigmoid":
        return torch.sigmoid(logits)
    if function == "straight_through":
        soft = torch.sigmoid(logits)
        return (logits > 0).to(soft.dtype) + soft - soft.detach()
    if function == "hard":
        return (logits > 0).to(logits.dtype)
    raise ValueError(f"unknown gate function {function!r}; choose one of {GATE_FUNCTIONS + ('hard',)}")


def ones_gates(locations: Sequence[GateLocation], device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """All-one gates: the original network, as the official evaluation scripts run it."""
    return [torch.ones(1, loc.channels, device=device) for loc in locations]

"""Neural Architecture Disentanglement (NAD, paper 05): per-class channel gates ("paths").

A gate multiplies one layer's output channel-wise. For each class c, NAD learns gate logits m^c
(one vector per gate location) on a frozen network so that the gated network still classifies c and
keeps its activations, while as few channels as possible stay open; the class path is the set of
channels with sigmoid(m) > 0.5. Everything here follows the official code `hujiecpp/NAD` as
described in `shared/papers/05_architecture_disentanglement.md` (sections 3, 4 and 6); each official
quirk is the default and has a switch.

Contents, in pipeline order:
- placement: `gate_locations` (official locations for VGG16 / ResNet-50 / DenseNet-121, and the same
  rules for any torchvision plain / residual / dense network, read from its `models.anatomy`);
- gating: `gated` context manager (forward hooks, always removed) with per-sample gate rows, so one
  forward can carry (class, image) pairs of many classes;
- search: `find_paths_sequential` (the official one-class-after-another loop, a reference) and
  `search_paths` (all classes of a chunk in one batched computation, same result within float
  tolerance); both return a `PathSet`;
- analysis: path IoU similarity, 2x2 mosaics and the per-layer hit rate, path accuracy,
  misclassification ranks, class-group similarity and the v1 diversity reconstruction;
- notebook 05: `NADSettings` (profile [nad]), `prepare_network`, `search_paths_cached`,
  `analyse_architecture`, `class_groups` + `similarity_by_group` (class hierarchy),
  `misclassification_table`, `dissect_locations` + `path_concepts` (concepts on paths), `claim_rows`
  (verdict rules) + `claim_results` (the claims table) and the figures.

The backbone must be in eval mode (frozen BatchNorm statistics): only then is every sample's output
independent of the rest of the batch, which is what makes the batched search equal the sequential one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from replication import cache, io, runtime
from replication.analysis.features import dissect_layers
from replication.data.classification import ClassificationDataset
from replication.models.anatomy import FAMILY_OF_ARCH, Anatomy, anatomy_of, connection_family
from replication.models.backbones import BackboneConfig
from replication.models.hooks import get_module
from replication.models.surgery import eval_mode, fold_batchnorm, frozen
from replication.reporting.claims import ClaimResult
from replication.training.classifiers import train_world_classifier
from replication.training.loop import TrainConfig
from replication.runtime import progress, resolve_device

GATE_FUNCTIONS = ("sigmoid", "straight_through")
SEEDINGS = ("per_class", "sequential")
ORIGINAL_CACHE_BYTES = 2 * 2**30  # search_paths keeps the original outputs of a class chunk up to this size

# Sparsity weight beta from the comment table of the official `findpath.py` (spec section 3.3) [C].
OFFICIAL_BETA = {
    "imagenet": {"vgg16": 4.5, "resnet50": 0.02, "densenet121": 0.02, "darts": 0.45},
    "places365": {"vgg16": 5.0, "resnet50": 0.02, "densenet121": 0.02, "darts": 0.20},
}
# The official architecture whose beta a project architecture inherits (same connection type) [I].
BETA_ARCH_OF_FAMILY = {"plain": "vgg16", "residual": "resnet50", "dense": "densenet121"}


def official_beta(arch: str, dataset: str = "imagenet") -> float:
    """beta for `arch`: the official value, or that of the official network with the same connection type."""
    if dataset not in OFFICIAL_BETA:
        raise ValueError(f"unknown dataset {dataset!r} for beta; choose one of {sorted(OFFICIAL_BETA)}")
    table = OFFICIAL_BETA[dataset]
    if arch in table:
        return table[arch]
    if arch not in FAMILY_OF_ARCH:
        raise ValueError(f"no beta known for architecture {arch!r}; pass beta explicitly or use one of "
                         f"{sorted(set(table) | set(FAMILY_OF_ARCH))}")
    return table[BETA_ARCH_OF_FAMILY[FAMILY_OF_ARCH[arch]]]


# ----------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------
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


_PLACEMENT = {"plain": _plain_gates, "residual": _residual_gates, "dense": _dense_gates}


def gate_locations(model: nn.Module, image_shape: Sequence[int] = (3, 224, 224), *,
                   device: str | torch.device | None = "cpu") -> list[GateLocation]:
    """The official gate locations of `model`, with channels and spatial sizes from one dummy forward."""
    body = anatomy_of(model)
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


# ----------------------------------------------------------------------------------------------
# Gating
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Path search
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathSearchConfig:
    """Hyper-parameters of the per-class path search; defaults are the official code's [C].

    `beta` depends on the architecture (`official_beta`): None until it is set for one (the profile's
    [nad.search] table leaves it to `NADSettings.search_config`); a search needs it. `epochs=20` gives the
    gates the official evaluation reads (`net_iter020`; the 21st trained epoch is never used).
    Switches for the official quirks (spec section 4 item 10): `divide_ce_by_layers` (CE / L as
    well as the MSE), `mse_on_correct_only` (MSE over the images the original net gets right),
    `skip_batches_without_correct` (no step when there are none). `seeding="per_class"` (spec
    recommendation: seed + class id, so any class subset is reproducible) or "sequential" (one
    generator seeded once, classes drawn in order: the official order dependence) [I].
    `gate_function="straight_through"` is the possible v1 variant (spec open point 13) [I].
    """

    beta: float | None = None
    lr: float = 0.1
    epochs: int = 20
    batch_size: int = 16
    seed: int = 233
    seeding: str = "per_class"
    init_std: float = 1.0
    divide_ce_by_layers: bool = True
    mse_on_correct_only: bool = True
    skip_batches_without_correct: bool = True
    gate_function: str = "sigmoid"
    grad_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.seeding not in SEEDINGS:
            raise ValueError(f"seeding must be one of {SEEDINGS}, not {self.seeding!r}")
        if self.gate_function not in GATE_FUNCTIONS:
            raise ValueError(f"gate_function must be one of {GATE_FUNCTIONS}, not {self.gate_function!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0; got {self.epochs}, "
                             f"{self.batch_size}, {self.lr}")


@dataclass
class PathSet:
    """Learned gate logits of several classes: `logits[l]` is (K, C_l), row k for `classes[k]`."""

    classes: list[int]
    locations: list[GateLocation]
    logits: list[torch.Tensor]
    config: dict[str, Any]

    def paths(self) -> list[torch.Tensor]:
        """Boolean (K, C_l) per location: unit u is on class k's path iff sigmoid(m) > 0.5, i.e. m > 0."""
        return [m > 0 for m in self.logits]

    def hard_gates(self) -> list[torch.Tensor]:
        """0/1 gates (K, C_l), the official evaluation-mode sub-networks."""
        return [gate_values(m, "hard") for m in self.logits]

    def row(self, class_id: int) -> int:
        if class_id not in self.classes:
            raise KeyError(f"class {class_id} has no path; classes with paths: {self.classes}")
        return self.classes.index(class_id)

    def units_kept(self) -> pd.DataFrame:
        """Fraction of units kept, |P_l^c| / C_l, one row per (class, location)."""
        rows = []
        for index, (location, path) in enumerate(zip(self.locations, self.paths())):
            for k, class_id in enumerate(self.classes):
                rows.append({"class_id": class_id, "layer": index, "location": location.name,
                             "kept": int(path[k].sum()), "channels": location.channels,
                             "fraction": float(path[k].float().mean())})
        return pd.DataFrame(rows)

    def save(self, path: str | Path) -> Path:
        return io.save_torch(path, {"classes": list(self.classes), "logits": [m.cpu() for m in self.logits],
                                    "locations": [asdict(loc) for loc in self.locations],
                                    "config": dict(self.config)})

    @classmethod
    def load(cls, path: str | Path) -> "PathSet":
        data = io.load_torch(path)
        return cls(list(data["classes"]), [GateLocation(**loc) for loc in data["locations"]],
                   list(data["logits"]), dict(data["config"]))


@dataclass
class _ClassPlan:
    """The random draws of one class's search: initial gate logits and one image order per epoch."""

    init: list[torch.Tensor]
    orders: list[torch.Tensor]


def _class_plans(classes: Sequence[int], sizes: Sequence[int], locations: Sequence[GateLocation],
                 config: PathSearchConfig) -> list[_ClassPlan]:
    """Draw every class's initialisation and shuffles up front, so both search loops see the same."""
    shared = torch.Generator().manual_seed(config.seed)
    plans = []
    for class_id, size in zip(classes, sizes):
        gen = shared if config.seeding == "sequential" else torch.Generator().manual_seed(config.seed + class_id)
        init = [torch.randn(loc.channels, generator=gen) * config.init_std for loc in locations]
        orders = [torch.randperm(size, generator=gen) for _ in range(config.epochs)]
        plans.append(_ClassPlan(init, orders))
    return plans


def _check_inputs(model: nn.Module, class_images: Mapping[int, torch.Tensor], classes: Sequence[int] | None,
                  config: PathSearchConfig):
    if config.beta is None:
        raise ValueError("PathSearchConfig.beta is not set; give it (official_beta(arch) is the official value for an arch)")
    if model.training:
        raise ValueError("the backbone must be in eval mode for path search (frozen BatchNorm); call model.eval()")
    classes = list(class_images) if classes is None else list(classes)
    missing = [c for c in classes if c not in class_images or len(class_images[c]) == 0]
    if missing:
        raise ValueError(f"no training images for classes {missing}; pass a non-empty tensor per class")
    return classes


def _normalised_step(logits: torch.Tensor, grad: torch.Tensor, config: PathSearchConfig,
                     active: torch.Tensor | None = None) -> None:
    """m <- m - lr * g / max(||g||, eps), the norm over each row's whole gate vector (in place).

    `active` (K,) limits the step to the rows (classes) that took part in this batch.
    """
    step = config.lr * grad / grad.norm(dim=-1, keepdim=True).clamp_min(config.grad_eps)
    logits.sub_(step if active is None else step * active[:, None])


def class_path_loss(logits: torch.Tensor, gated: Mapping[str, torch.Tensor], original: Mapping[str, torch.Tensor],
                    labels: torch.Tensor, correct: torch.Tensor, gate_logits: Sequence[torch.Tensor],
                    config: PathSearchConfig) -> torch.Tensor:
    """The official objective for one class on one batch (spec section 3.2).

    L = [CE(all images) + sum_l MSE_l(correct images)] / L_gates + beta * mean_l mean_u sigmoid(m)^2,
    with the quirk switches of `PathSearchConfig`.
    """
    n_layers = len(gate_logits)
    ce = F.cross_entropy(logits, labels)
    subset = correct if config.mse_on_correct_only else torch.ones_like(correct)
    mse = sum((F.mse_loss(gated[name][subset], original[name][subset]) for name in original),
              logits.new_zeros(())) if subset.any() else logits.new_zeros(())
    act = (ce + mse) / n_layers if config.divide_ce_by_layers else ce + mse / n_layers
    sparsity = sum(torch.sigmoid(m).pow(2).mean() for m in gate_logits) / n_layers
    return act + config.beta * sparsity


def find_paths_sequential(model: nn.Module, locations: Sequence[GateLocation],
                          class_images: Mapping[int, torch.Tensor], classes: Sequence[int] | None = None, *,
                          config: PathSearchConfig, device: str | torch.device | None = None) -> PathSet:
    """The official loop: one class after another, one batch of that class's images per step.

    Kept as the reference `search_paths` is checked against, and as the benchmark's baseline.
    """
    classes = _check_inputs(model, class_images, classes, config)
    device = resolve_device(device)
    plans = _class_plans(classes, [len(class_images[c]) for c in classes], locations, config)
    learned = []
    with frozen(model), gated(model, locations) as hooks:
        for class_id, plan in progress(list(zip(classes, plans)), desc="paths (sequential)"):
            gate_logits = [m.to(device).requires_grad_(True) for m in plan.init]
            images = class_images[class_id]
            for order in plan.orders:
                for batch in order.split(config.batch_size):
                    x = images[batch].to(device)
                    labels = torch.full((len(x),), class_id, device=device, dtype=torch.long)
                    hooks.set(None)
                    with torch.no_grad():
                        correct = model(x).argmax(1) == labels
                    original = dict(hooks.outputs)
                    if config.skip_batches_without_correct and not correct.any():
                        continue
                    hooks.set([gate_values(m, config.gate_function)[None] for m in gate_logits])
                    loss = class_path_loss(model(x), hooks.outputs, original, labels, correct, gate_logits, config)
                    grads = torch.autograd.grad(loss, gate_logits)
                    with torch.no_grad():
                        for m, g in zip(gate_logits, grads):
                            _normalised_step(m, g, config)
            learned.append([m.detach().cpu() for m in gate_logits])
    logits = [torch.stack([per_class[l] for per_class in learned]) for l in range(len(locations))]
    return PathSet(classes, list(locations), logits, asdict(config))


def _segment_mean(values: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-row weighted mean of per-sample `values` (0 for rows with no weight)."""
    total = values.new_zeros(n_rows).index_add(0, rows, values * weights)
    count = values.new_zeros(n_rows).index_add(0, rows, weights)
    return total / count.clamp_min(1)


def search_copy(model: nn.Module, locations: Sequence[GateLocation]) -> tuple[nn.Module, torch.memory_format]:
    """A copy of the frozen eval-mode `model` that computes the same function faster for path search.

    BatchNorm is folded into the convs before it (`surgery.fold_batchnorm`), except at gate locations.
    Returns the copy and the memory format to feed it: channels-last on the CPU when no BatchNorm is
    left (measured there: 1.2-1.4x faster gated steps; BatchNorm's backward is slow in that layout),
    else contiguous.
    """
    copy_ = fold_batchnorm(model, keep={loc.name for loc in locations})
    on_cpu = all(p.device.type == "cpu" for p in copy_.parameters())
    if on_cpu and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in copy_.modules()):
        return copy_.to(memory_format=torch.channels_last), torch.channels_last
    return copy_, torch.contiguous_format


def _original_bytes(locations: Sequence[GateLocation], n_images: int) -> int:
    """Memory the original outputs at every gate location take for `n_images` images (float32)."""
    return 4 * n_images * sum(loc.channels * loc.height * loc.width for loc in locations)


@torch.no_grad()
def _original_outputs(model: nn.Module, hooks: GateHooks, images: torch.Tensor, label: int, batch_size: int,
                      device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The original net's outputs at every gate location, and whether it classifies each image as `label`."""
    hooks.set(None)
    outputs: dict[str, list[torch.Tensor]] = {}
    correct = []
    for start in range(0, len(images), batch_size):
        correct.append(model(images[start:start + batch_size].to(device)).argmax(1) == label)
        for name, value in hooks.outputs.items():
            outputs.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in outputs.items()}, torch.cat(correct)


def _search_chunk(model: nn.Module, locations: Sequence[GateLocation], class_images: Mapping[int, torch.Tensor],
                  classes: Sequence[int], plans: Sequence[_ClassPlan], config: PathSearchConfig,
                  device: torch.device, cache_original: bool, memory_format: torch.memory_format) -> list[torch.Tensor]:
    """Learn the gates of `classes` together: the batch holds (class, image) pairs, gates indexed per sample.

    `cache_original`: run the original net once per image and keep its outputs (the images are fixed
    tensors, so they are the same every epoch) instead of once per step as the official loop does.
    `memory_format`: the layout `model` runs fastest in (`search_copy`).
    """
    n_classes, n_layers, bs = len(classes), len(locations), config.batch_size
    gate_logits = [torch.stack([plan.init[l] for plan in plans]).to(device).requires_grad_(True)
                   for l in range(n_layers)]
    images = [class_images[c].contiguous(memory_format=memory_format) for c in classes]
    class_ids = torch.tensor(classes, device=device)
    with frozen(model), gated(model, locations) as hooks:
        cached = [_original_outputs(model, hooks, images[k], c, max(bs, 256), device) for k, c in enumerate(classes)
                  ] if cache_original else None
        for epoch in range(config.epochs):
            orders = [plan.orders[epoch] for plan in plans]
            steps = max(math.ceil(len(order) / bs) for order in orders)
            for step in range(steps):
                batches = [(k, order[step * bs:(step + 1) * bs]) for k, order in enumerate(orders)
                           if step * bs < len(order)]
                x = torch.cat([images[k][batch] for k, batch in batches]).to(device, memory_format=memory_format)
                rows = torch.cat([torch.full((len(batch),), k, dtype=torch.long) for k, batch in batches]).to(device)
                labels = class_ids[rows]
                if cached is None:
                    hooks.set(None)
                    with torch.no_grad():
                        correct = model(x).argmax(1) == labels
                    original = dict(hooks.outputs)
                else:
                    correct = torch.cat([cached[k][1][batch.to(device)] for k, batch in batches])
                    original = {name: torch.cat([cached[k][0][name][batch.to(device)] for k, batch in batches])
                                for name in cached[0][0]}
                stepping = torch.zeros(n_classes, dtype=torch.bool, device=device)
                stepping[rows] = True
                if config.skip_batches_without_correct:
                    stepping &= torch.zeros(n_classes, device=device).index_add(0, rows, correct.float()) > 0
                    keep = stepping[rows]
                    if not keep.any():
                        continue
                    if not keep.all():
                        x, rows, labels, correct = x[keep], rows[keep], labels[keep], correct[keep]
                        original = {name: value[keep] for name, value in original.items()}
                hooks.set([gate_values(m, config.gate_function) for m in gate_logits], rows)
                logits = model(x)
                ones = torch.ones_like(correct, dtype=logits.dtype)
                ce = _segment_mean(F.cross_entropy(logits, labels, reduction="none"), rows, ones, n_classes)
                weights = correct.to(logits.dtype) if config.mse_on_correct_only else ones
                mse = sum(_segment_mean((hooks.outputs[name] - original[name]).square().mean(dim=(1, 2, 3)),
                                        rows, weights, n_classes) for name in original)
                act = (ce + mse) / n_layers if config.divide_ce_by_layers else ce + mse / n_layers
                sparsity = sum(torch.sigmoid(m).pow(2).mean(1) for m in gate_logits) / n_layers
                loss = ((act + config.beta * sparsity) * stepping).sum()
                grads = torch.autograd.grad(loss, gate_logits)
                with torch.no_grad():
                    for m, g in zip(gate_logits, grads):
                        _normalised_step(m, g, config, stepping)
    return [m.detach().cpu() for m in gate_logits]


def search_paths(model: nn.Module, locations: Sequence[GateLocation], class_images: Mapping[int, torch.Tensor],
                 classes: Sequence[int] | None = None, *, config: PathSearchConfig,
                 device: str | torch.device | None = None, class_chunk: int | None = None,
                 original_cache_bytes: int = ORIGINAL_CACHE_BYTES) -> PathSet:
    """Paths of many classes at once; equal (within float tolerance) to `find_paths_sequential`.

    `class_images[c]` holds class c's (normalised) training images as an (n_c, 3, H, W) tensor
    (`images_by_class` builds it). `class_chunk` bounds how many classes share one computation
    (memory: a step's batch holds up to `class_chunk * batch_size` images); None = all at once.
    The original net's outputs at the gate locations are computed once per image and kept when a
    chunk's take at most `original_cache_bytes` (the official loop recomputes them every step:
    one of its two forward passes); larger chunks recompute them per step. The search runs on
    `search_copy(model)` (BatchNorm folded into convs, channels-last on the CPU).
    """
    classes = _check_inputs(model, class_images, classes, config)
    device = resolve_device(device)
    model, memory_format = search_copy(model, locations)
    plans = _class_plans(classes, [len(class_images[c]) for c in classes], locations, config)
    chunk = class_chunk or len(classes)
    parts = []
    for start in progress(range(0, len(classes), chunk), desc="paths (batched)"):
        members = classes[start:start + chunk]
        cache_original = _original_bytes(locations, sum(len(class_images[c]) for c in members)) <= original_cache_bytes
        parts.append(_search_chunk(model, locations, class_images, members, plans[start:start + chunk], config,
                                   device, cache_original, memory_format))
    logits = [torch.cat([part[l] for part in parts]) for l in range(len(locations))]
    return PathSet(classes, list(locations), logits, asdict(config))


# ----------------------------------------------------------------------------------------------
# Data helpers
# ----------------------------------------------------------------------------------------------
def _image_and_label(item: Any) -> tuple[torch.Tensor, int | None]:
    """(image, label) from a dataset item: a dict with 'image' and 'class_id'/'label', a pair, or a tensor."""
    if isinstance(item, Mapping):
        label = item.get("class_id", item.get("label"))
        return item["image"], None if label is None else int(label)
    if isinstance(item, (tuple, list)):
        return item[0], int(item[1])
    if torch.is_tensor(item):
        return item, None
    raise TypeError(f"cannot read an image from a dataset item of type {type(item).__name__}; "
                    "expected a dict with 'image', an (image, label) pair or a tensor")


def images_by_class(dataset, labels: Sequence[int], classes: Sequence[int], *, batch_size: int = 256,
                    max_per_class: int | None = None, device: str | torch.device | None = "cpu"
                    ) -> dict[int, torch.Tensor]:
    """Load the images of `classes` once into tensors (path search reads them every epoch).

    `labels[i]` is the class of `dataset[i]`. `max_per_class` keeps the first images of each class.
    """
    labels = np.asarray(labels)
    if len(labels) != len(dataset):
        raise ValueError(f"got {len(labels)} labels for a dataset of {len(dataset)} items")
    out = {}
    for class_id in classes:
        index = np.flatnonzero(labels == class_id)[:max_per_class]
        if len(index) == 0:
            raise ValueError(f"class {class_id} has no images in this dataset")
        chunks = []
        for start in range(0, len(index), batch_size):
            chunks.append(torch.stack([_image_and_label(dataset[int(i)])[0] for i in index[start:start + batch_size]]))
        out[int(class_id)] = torch.cat(chunks).to(resolve_device(device))
    return out


# ----------------------------------------------------------------------------------------------
# Path similarity
# ----------------------------------------------------------------------------------------------
def path_iou(paths: Sequence[torch.Tensor], *, empty_value: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer IoU between every pair of class paths: (L, K, K) IoU and (L, K, K) 'both empty' mask.

    Official IoU is 0/0 when both paths are empty at a layer; we use `empty_value` (spec default 1) [I].
    """
    ious, empties = [], []
    for path in paths:
        p = path.float()
        inter = p @ p.T
        sizes = p.sum(1)
        union = sizes[:, None] + sizes[None, :] - inter
        empty = union == 0
        ious.append(torch.where(empty, torch.full_like(inter, empty_value), inter / union.clamp_min(1)))
        empties.append(empty)
    return torch.stack(ious), torch.stack(empties)


def path_similarity(paths: Sequence[torch.Tensor], *, empty_value: float = 1.0) -> torch.Tensor:
    """s(c, c') = mean over layers of the per-layer path IoU (spec section 6.3), a (K, K) matrix."""
    return path_iou(paths, empty_value=empty_value)[0].mean(0)


def path_diversity(similarity: torch.Tensor) -> float:
    """v1's 'diversity of concepts' reconstructed [I]: 1 - mean off-diagonal path similarity."""
    k = similarity.shape[0]
    if k < 2:
        raise ValueError("path diversity needs at least two classes")
    off = similarity[~torch.eye(k, dtype=torch.bool)]
    return float(1 - off.mean())


def group_similarity(similarity: torch.Tensor, groups: Sequence[Any]) -> dict[str, float]:
    """Mean path similarity of class pairs in the same group (e.g. superclass) vs different groups."""
    groups = np.asarray(groups)
    if len(groups) != similarity.shape[0]:
        raise ValueError(f"got {len(groups)} group labels for {similarity.shape[0]} classes")
    same = torch.as_tensor(groups[:, None] == groups[None, :])
    off = ~torch.eye(len(groups), dtype=torch.bool)
    within, between = similarity[same & off], similarity[~same]
    return {"within": float(within.mean()) if within.numel() else float("nan"),
            "between": float(between.mean()) if between.numel() else float("nan"),
            "n_within_pairs": int(within.numel()) // 2, "n_between_pairs": int(between.numel()) // 2}


def misclassification_ranks(similarity: torch.Tensor, classes: Sequence[int], true: Sequence[int],
                            predicted: Sequence[int]) -> np.ndarray:
    """For each misclassified image, the normalised mid-rank of s(true, predicted) among s(true, c'), c' != true.

    1 = the predicted class has the path most similar to the true class's, 0 = least similar; a
    predicted class drawn at random gives 0.5 in expectation (spec section 6.3 replication metric) [I].
    Pairs whose classes have no path are an error.
    """
    position = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    if k < 3:
        raise ValueError("misclassification ranks need paths for at least three classes")
    ranks = []
    for t, p in zip(true, predicted):
        if t == p:
            raise ValueError(f"image with true class {t} was classified correctly; pass misclassified images only")
        if t not in position or p not in position:
            raise ValueError(f"class {t if t not in position else p} has no path; restrict to classes {list(classes)}")
        row = similarity[position[t]].clone()
        others = torch.ones(k, dtype=torch.bool)
        others[position[t]] = False
        target = row[position[p]]
        below = (row[others] < target).sum().item()
        ties = (row[others] == target).sum().item() - 1
        ranks.append((below + 0.5 * ties) / (k - 2))
    return np.asarray(ranks, dtype=float)


# ----------------------------------------------------------------------------------------------
# Evaluation with hard gates
# ----------------------------------------------------------------------------------------------
def _gated_forward(model: nn.Module, hooks: GateHooks, x: torch.Tensor, gates: Sequence[torch.Tensor] | None,
                   rows: torch.Tensor | None) -> torch.Tensor:
    hooks.set(gates, rows)
    return model(x)


@torch.no_grad()
def path_accuracy(model: nn.Module, paths: PathSet, class_images: Mapping[int, torch.Tensor], *,
                  batch_size: int = 128, device: str | torch.device | None = None) -> pd.DataFrame:
    """Claim N1: per class, accuracy of the original net and of its hard-gated path on that class's images.

    Each image runs once through the original net and once through its own class's path (per-sample
    gate rows, so a batch mixes classes). Also returns the original net's predictions per image
    (column `predicted`, a list) for the misclassification analysis.
    """
    device = resolve_device(device)
    gates = [g.to(device) for g in paths.hard_gates()]
    images = torch.cat([class_images[c] for c in paths.classes])
    rows = torch.cat([torch.full((len(class_images[c]),), k, dtype=torch.long) for k, c in enumerate(paths.classes)])
    original, gated_pred = [], []
    with gated(model, paths.locations) as hooks:
        for start in range(0, len(images), batch_size):
            x, r = images[start:start + batch_size].to(device), rows[start:start + batch_size].to(device)
            original.append(_gated_forward(model, hooks, x, None, None).argmax(1).cpu())
            gated_pred.append(_gated_forward(model, hooks, x, gates, r).argmax(1).cpu())
    labels = torch.tensor(paths.classes)[rows]
    frame = pd.DataFrame({"class_id": labels.numpy(), "original": torch.cat(original).numpy(),
                          "path": torch.cat(gated_pred).numpy()})
    kept = paths.units_kept().groupby("class_id")[["kept", "channels"]].sum()
    out = []
    for class_id, group in frame.groupby("class_id", sort=False):
        out.append({"class_id": int(class_id), "n_images": len(group),
                    "original_accuracy": float((group["original"] == class_id).mean()),
                    "path_accuracy": float((group["path"] == class_id).mean()),
                    "units_kept": float(kept.loc[class_id, "kept"] / kept.loc[class_id, "channels"]),
                    "predicted": group["original"].astype(int).tolist()})
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------------------
# Mosaics and hit rate
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mosaic:
    """Four dataset indices (quadrants row-major: 0 top-left .. 3 bottom-right) and their classes."""

    indices: tuple[int, int, int, int]
    classes: tuple[int, int, int, int]


def sample_mosaics(labels: Sequence[int], classes: Sequence[int], n_mosaics: int, *, seed: int) -> list[Mosaic]:
    """`n_mosaics` 2x2 mosaics, each of four distinct classes from `classes`, one random image each.

    The official draw is unseeded (spec section 4 item 7); here it is seeded so every architecture
    sees the same mosaics [I].
    """
    labels = np.asarray(labels)
    if len(set(classes)) < 4:
        raise ValueError(f"mosaics need at least 4 distinct classes, got {sorted(set(classes))}")
    pools = {c: np.flatnonzero(labels == c) for c in classes}
    empty = [c for c, pool in pools.items() if len(pool) == 0]
    if empty:
        raise ValueError(f"classes {empty} have no images to put in mosaics")
    rng = np.random.default_rng(seed)
    mosaics = []
    for _ in range(n_mosaics):
        chosen = rng.choice(np.asarray(sorted(set(classes))), size=4, replace=False)
        indices = tuple(int(rng.choice(pools[int(c)])) for c in chosen)
        mosaics.append(Mosaic(indices, tuple(int(c) for c in chosen)))
    return mosaics


def mosaic_tensor(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Paste four images (3, H, W) into a 2x2 grid of tiles of the first image's size, resize to `size`.

    Official: each tile 224, the 448 mosaic resized to the 224 input, so a quadrant is half the
    network's input size; bilinear with antialiasing (resizing commutes with normalisation).
    """
    if len(images) != 4:
        raise ValueError(f"a mosaic needs exactly 4 images, got {len(images)}")
    tile = images[0].shape[-2:]
    tiles = [img if img.shape[-2:] == tile else
             F.interpolate(img[None], size=tuple(tile), mode="bilinear", antialias=True, align_corners=False)[0]
             for img in images]
    grid = torch.cat([torch.cat(tiles[:2], dim=2), torch.cat(tiles[2:], dim=2)], dim=1)
    if grid.shape[-1] == size and grid.shape[-2] == size:
        return grid
    return F.interpolate(grid[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def top_fraction_mask(maps: torch.Tensor, size: int, *, top_fraction: float = 0.1,
                      quantize_uint8: bool = True) -> torch.Tensor:
    """Binary top-`top_fraction` masks (N, size, size) of activation maps (N, h, w), as `cam_2x2.py`.

    Min-max normalise, optionally cast to uint8 (truncating), resize bicubic to `size` (uint8 output
    rounded and clipped), threshold at the k-th largest value with a strict `>` (official: uint8 ties
    can make the mask much smaller than k). `quantize_uint8=False`: float maps, exactly the top k [I].
    """
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    norm = torch.where(span > 0, (maps - lo) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))
    if quantize_uint8:
        norm = torch.floor(norm * 255)
    resized = norm[:, None] if norm.shape[-2:] == (size, size) else \
        F.interpolate(norm[:, None], size=(size, size), mode="bicubic", align_corners=False)
    flat = resized.flatten(1)
    k = int(math.floor(top_fraction * size * size))
    if k < 1:
        raise ValueError(f"top_fraction={top_fraction} selects no pixel of a {size}x{size} map")
    if quantize_uint8:
        flat = flat.round().clamp(0, 255) / 255
        threshold = flat.topk(k, dim=1).values[:, -1:]
        mask = flat > threshold
    else:
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter(1, flat.topk(k, dim=1).indices, True)
    return mask.view(-1, size, size)


def quadrant_share(mask: torch.Tensor, quadrant: int) -> torch.Tensor:
    """Share of the selected pixels that lie in `quadrant` (row-major), NaN when nothing is selected."""
    size = mask.shape[-1]
    half = size // 2
    r, c = divmod(quadrant, 2)
    inside = mask[:, r * half:(r + 1) * half if r == 0 else size, c * half:(c + 1) * half if c == 0 else size]
    total = mask.flatten(1).sum(1).float()
    return inside.flatten(1).sum(1).float() / total  # 0/0 -> NaN, counted by the caller


@torch.no_grad()
def hit_rates(model: nn.Module, paths: PathSet, dataset, mosaics: Sequence[Mosaic], *, mosaic_size: int,
              top_fraction: float = 0.1, quantize_uint8: bool = True, path_shift: int = 0,
              batch_size: int = 64, device: str | torch.device | None = None) -> pd.DataFrame:
    """Hit rate of every (mosaic, quadrant, gate location) (spec section 6.1).

    For quadrant q the hard path of the class in quadrant (q + path_shift) % 4 gates all locations
    (0 = the official own-class path; 1..3 = a control with another class's path); the channel sum
    of the gated output at each location gives the map whose top pixels are counted in quadrant q.
    Returns one row per (mosaic, quadrant, layer) with `hit` (NaN when no pixel is above threshold).
    """
    device = resolve_device(device)
    gates = [g.to(device) for g in paths.hard_gates()]
    tiles = torch.stack([mosaic_tensor([_image_and_label(dataset[i])[0] for i in m.indices], mosaic_size)
                         for m in mosaics])
    records = []
    with gated(model, paths.locations) as hooks:
        for quadrant in range(4):
            source = (quadrant + path_shift) % 4
            rows_all = torch.tensor([paths.row(m.classes[source]) for m in mosaics])
            for start in range(0, len(mosaics), batch_size):
                x = tiles[start:start + batch_size].to(device)
                rows = rows_all[start:start + batch_size].to(device)
                _gated_forward(model, hooks, x, gates, rows)
                for layer, location in enumerate(paths.locations):
                    maps = hooks.outputs[location.name].sum(1).float()
                    mask = top_fraction_mask(maps, mosaic_size, top_fraction=top_fraction,
                                             quantize_uint8=quantize_uint8)
                    for offset, hit in enumerate(quadrant_share(mask, quadrant).cpu().tolist()):
                        records.append({"mosaic": start + offset, "quadrant": quadrant, "layer": layer,
                                        "location": location.name, "hit": hit,
                                        "class_id": mosaics[start + offset].classes[quadrant]})
    return pd.DataFrame(records)


def summarize_hit_rates(hits: pd.DataFrame) -> pd.DataFrame:
    """Per layer: mean hit rate and std over mosaics (each mosaic = mean of its 4 quadrants),
    normalised depth l / (L - 1), and how many quadrant maps had no pixel above threshold."""
    per_mosaic = hits.groupby(["layer", "location", "mosaic"], sort=True)["hit"].mean().reset_index()
    summary = per_mosaic.groupby(["layer", "location"], sort=True)["hit"].agg(["mean", "std", "count"]).reset_index()
    summary["empty_maps"] = hits.groupby(["layer", "location"], sort=True)["hit"].apply(
        lambda s: int(s.isna().sum())).to_numpy()
    n_layers = len(summary)
    summary["depth"] = summary["layer"] / max(n_layers - 1, 1)
    return summary.rename(columns={"mean": "hit_rate", "std": "hit_std", "count": "n_mosaics"})


def largest_dip(summary: pd.DataFrame) -> dict[str, Any]:
    """Claim N5: the largest drop of the hit rate from any shallower layer to a deeper one.

    `significant` when the drop exceeds the combined standard error sqrt(se_a^2 + se_b^2) with
    se = std over mosaics / sqrt(n_mosaics) (spec: 'larger than the std over mosaics / sqrt(100)') [I].
    """
    means = summary["hit_rate"].to_numpy()
    se = (summary["hit_std"] / np.sqrt(summary["n_mosaics"])).to_numpy()
    best = {"drop": 0.0, "from_layer": None, "to_layer": None, "significant": False}
    for deep in range(1, len(means)):
        shallow = int(np.nanargmax(means[:deep]))
        drop = float(means[shallow] - means[deep])
        if drop > best["drop"]:
            best = {"drop": drop, "from_layer": shallow, "to_layer": deep,
                    "significant": bool(drop > math.hypot(se[shallow], se[deep]))}
    return best


def curve_distance(a: pd.DataFrame, b: pd.DataFrame, *, grid: int = 21) -> float:
    """Claim N6: mean absolute difference of two hit-rate curves on normalised depth [0, 1] (linear interpolation)."""
    depth = np.linspace(0, 1, grid)
    ya = np.interp(depth, a["depth"].to_numpy(), a["hit_rate"].to_numpy())
    yb = np.interp(depth, b["depth"].to_numpy(), b["hit_rate"].to_numpy())
    return float(np.mean(np.abs(ya - yb)))


def path_concepts(paths: PathSet, units: Mapping[str, pd.DataFrame], concepts: Mapping[int, Sequence[str]], *,
                  n_random: int = 100, seed: int = 0) -> pd.DataFrame:
    """v1's 'diversity of human concepts along paths', measured with dissection labels [I].

    `units[location]`: the dissection unit table of that gate location (columns unit, label,
    detector), for all gate locations or a subset (then only those count). Per class: how many path units are detectors, how many distinct concepts they
    detect, and which share of the class's own defining concepts (`concepts[c]`) label some detector
    on its path, against random unit sets of the same per-layer sizes (`n_random` draws, seeded)
    and against all units of the network.
    """
    unknown = sorted(set(units) - {loc.name for loc in paths.locations})
    if unknown or not units:
        raise ValueError(f"dissection unit tables must be keyed by gate locations {[l.name for l in paths.locations]}; "
                         f"got {sorted(units)}")
    chosen = [(i, loc) for i, loc in enumerate(paths.locations) if loc.name in units]
    labels = []  # per dissected location: label of each unit, '' where the unit is no detector
    for _, loc in chosen:
        table = units[loc.name].set_index("unit").sort_index()
        if len(table) != loc.channels:
            raise ValueError(f"dissection of {loc.name} has {len(table)} units, the gate has {loc.channels}")
        labels.append(np.where(table["detector"].to_numpy(bool), table["label"].astype(str).to_numpy(), ""))
    rng = np.random.default_rng(seed)
    all_labels = set(np.concatenate(labels)) - {""}
    rows = []
    for k, class_id in enumerate(paths.classes):
        own = set(concepts.get(class_id, ()))
        on_path = [lab[paths.paths()[i][k].numpy()] for lab, (i, _) in zip(labels, chosen)]
        found = set(np.concatenate(on_path)) - {""}
        random_found = []
        for _ in range(n_random):
            drawn = set(np.concatenate([lab[rng.permutation(len(lab))[:len(chosen)]]
                                        for lab, chosen in zip(labels, on_path)])) - {""}
            random_found.append(len(own & drawn) / max(len(own), 1))
        rows.append({"class_id": class_id, "path_units": int(sum(len(c) for c in on_path)),
                     "path_detectors": int(sum((c != "").sum() for c in on_path)),
                     "distinct_concepts": len(found),
                     "own_concepts_found": len(own & found) / max(len(own), 1),
                     "own_concepts_found_random": float(np.mean(random_found)) if random_found else float("nan"),
                     "own_concepts_found_all_units": len(own & all_labels) / max(len(own), 1)})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class NADSettings:
    """Notebook 05's settings, the profile section [nad].

    `archs`: one per connection type; `data_root`: an ImageFolder dataset instead of the profile's
    ConceptWorld (then the models need pretrained `weights` overrides); `max_classes`: the first
    classes only (spec open point 3: 100 for ImageNet; None = every class); `model_overrides[arch]` /
    `train_overrides[arch]` change the profile's [model] / [train] fields for that arch (an arch
    without overrides is the shared baseline of notebook 00). `search` (the table [nad.search]) is the
    `PathSearchConfig` of every arch, with beta from `official_beta(arch, beta_dataset)` unless
    `beta[arch]` is given (`search_config`). `*_images_per_class` cap the images used (None = all).
    `dissect_layers`: dissect only the last gate locations (None = all). `mosaic_scale`: mosaic side /
    image side (official 1: the 2x2 mosaic is resized to the input size; 2 keeps every quadrant at
    the training resolution) [I].
    """

    archs: tuple[str, ...] = ("vgg16_bn", "resnet18", "densenet121")
    data_root: str | None = None
    max_classes: int | None = None
    model_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    train_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    beta: Mapping[str, float] = field(default_factory=dict)
    beta_dataset: str = "imagenet"
    search: PathSearchConfig = PathSearchConfig()
    train_images_per_class: int | None = None
    val_images_per_class: int | None = None
    class_chunk: int | None = None
    n_mosaics: int = 100
    mosaic_seed: int = 0
    mosaic_scale: int = 2
    top_fraction: float = 0.1
    quantize_uint8: bool = True
    empty_iou: float = 1.0
    n_random_paths: int = 100
    dissect_layers: int | None = None

    def __post_init__(self) -> None:
        if self.dissect_layers is not None and self.dissect_layers < 1:
            raise ValueError(f"[nad] dissect_layers = {self.dissect_layers}: give at least 1 "
                             "(or leave it out to dissect every gate location).")

    def search_config(self, arch: str) -> PathSearchConfig:
        """`search` with the beta of `arch`: `beta[arch]` when given, else `official_beta(arch, beta_dataset)`."""
        beta = self.beta.get(arch)
        return dataclasses.replace(self.search, beta=official_beta(arch, self.beta_dataset) if beta is None else float(beta))

    def dissected_locations(self, locations: Sequence[GateLocation]) -> list[GateLocation]:
        """The gate locations whose units are dissected: the last `dissect_layers` of them (None = all)."""
        if self.dissect_layers is None:
            return list(locations)
        return list(locations[max(len(locations) - self.dissect_layers, 0):])


@dataclass(frozen=True)
class ClassGroups:
    """What groups the searched `classes` (lists in their order): `names`, `superclass` (index into the
    dataset's superclasses) and `scene`, plus each class's rule concepts (`concepts[class_id]`). An
    ImageFolder dataset has no rules: its concepts are empty and each class is its own scene."""

    classes: list[int]
    names: list[str]
    superclass: list[int]
    scene: list[str]
    concepts: dict[int, list[str]]

    def order(self) -> list[int]:
        """Positions in `classes` sorted by superclass, scene and class id (related classes side by side)."""
        return sorted(range(len(self.classes)), key=lambda i: (self.superclass[i], self.scene[i], self.classes[i]))


def class_groups(dataset: ClassificationDataset, classes: Sequence[int]) -> ClassGroups:
    """The `ClassGroups` of `classes` of `dataset` (scene and concepts from its class rules)."""
    names = [dataset.classes[c] for c in classes]
    return ClassGroups(classes=list(classes), names=names, superclass=[dataset.superclass_of[c] for c in classes],
                       scene=[dataset.rules[c].get("scene", name) for c, name in zip(classes, names)],
                       concepts={c: list(dataset.rules[c].values()) for c in classes})


def similarity_by_group(results: Mapping[str, ArchitectureResult], groups: ClassGroups) -> pd.DataFrame:
    """Per network and grouping (superclass, scene): mean path similarity of class pairs within vs
    between groups (`group_similarity`); the paths' classes must be `groups.classes`, in that order."""
    return pd.DataFrame([{"arch": arch, "grouping": name, **group_similarity(result.similarity, labels)}
                         for arch, result in results.items()
                         for name, labels in (("superclass", groups.superclass), ("scene", groups.scene))])


def misclassification_table(results: Mapping[str, ArchitectureResult], groups: ClassGroups) -> pd.DataFrame:
    """N7 per network: how many val images were misclassified, the mean normalised rank of their
    (true, predicted) path similarity with its standard error, and the share of them whose predicted
    class has the true class's superclass (NaN without misclassifications)."""
    superclass = dict(zip(groups.classes, groups.superclass))
    rows = []
    for arch, result in results.items():
        wrong = result.misclassification
        same = [superclass[t] == superclass[p] for t, p in zip(wrong["true"], wrong["predicted"])]
        rows.append({"arch": arch, "misclassified": len(wrong), "mean_rank": wrong["rank"].mean(),
                     "se": wrong["rank"].std(ddof=1) / np.sqrt(max(len(wrong), 1)),
                     "same_superclass": np.mean(same) if same else np.nan})
    return pd.DataFrame(rows)


def prepare_network(settings: NADSettings, arch: str, root: str | Path, *, model_config: BackboneConfig,
                    train_config: TrainConfig, seed: int,
                    device: str | torch.device | None = None) -> tuple[nn.Module, dict[str, Any], pd.DataFrame | None]:
    """The network NAD disentangles for `arch`: pretrained from `weights`, or trained on `root` through
    the shared cache (`train_world_classifier`, so the [model] baseline is notebook 00's).

    `model_config` / `train_config` are the profile's [model] / [train]; `arch`, `seed` and the
    settings' overrides for `arch` are applied to them. Returns the frozen model in eval mode, a key
    identifying it (for `search_paths_cached`) and the training history (None for pretrained weights).
    """
    model_config = dataclasses.replace(model_config, arch=arch, **settings.model_overrides.get(arch, {}))
    train_config = dataclasses.replace(dataclasses.replace(train_config, seed=seed), **settings.train_overrides.get(arch, {}))
    train_set = ClassificationDataset(root, "train")
    key = {"model": model_config, "data": train_set.fingerprint}
    if model_config.weights:
        model, history = model_config.build(len(train_set.classes)), None
    else:
        result = train_world_classifier(root, model_config, train_config, device=device)
        model, history = result.model, result.history
        key["train"] = train_config
    model = model.to(resolve_device(device)).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, key, history


def search_paths_cached(model: nn.Module, locations: Sequence[GateLocation], class_images: Mapping[int, torch.Tensor],
                        classes: Sequence[int], *, config: PathSearchConfig, key: Any,
                        device: str | torch.device | None = None, class_chunk: int | None = None) -> PathSet:
    """`search_paths` behind the configuration cache; `key` identifies the model and the images."""
    folder = cache.stage_dir("nad_paths", {"key": key, "config": config, "classes": list(classes),
                                           "locations": [asdict(loc) for loc in locations],
                                           **runtime.compute_identity(device)})
    if cache.is_done(folder):
        return PathSet.load(folder / "paths.pt")
    paths = search_paths(model, locations, class_images, classes, config=config, device=device,
                         class_chunk=class_chunk)
    paths.save(folder / "paths.pt")
    cache.mark_done(folder, {"config": config, "classes": list(classes)})
    return paths


def path_diversity_se(similarity: torch.Tensor) -> float:
    """Jackknife standard error (over classes) of `path_diversity`."""
    k = similarity.shape[0]
    if k < 3:
        return float("nan")
    values = np.array([path_diversity(similarity[np.delete(np.arange(k), i)][:, np.delete(np.arange(k), i)])
                       for i in range(k)])
    return float(np.sqrt((k - 1) / k * np.sum((values - values.mean()) ** 2)))


@dataclass
class ArchitectureResult:
    """Everything notebook 05 measures on one network."""

    arch: str
    family: str
    paths: PathSet
    accuracy: pd.DataFrame          # per class: original vs path accuracy, units kept (N1)
    hits: pd.DataFrame              # per (mosaic, quadrant, layer) hit, own paths (N4)
    hit_summary: pd.DataFrame       # per layer mean/std, depth (N4-N6)
    control_summary: pd.DataFrame   # the same with another mosaic class's path (control)
    similarity: torch.Tensor        # (K, K) path similarity (N7, hierarchy)
    empty_layers: int               # class pairs x layers where both paths were empty (IoU := empty_iou)
    misclassification: pd.DataFrame  # per misclassified val image: true, predicted, normalised rank (N7)

    @property
    def diversity(self) -> float:
        return path_diversity(self.similarity)


def analyse_architecture(model: nn.Module, arch: str, paths: PathSet, val_images: Mapping[int, torch.Tensor],
                         mosaic_source, mosaics: Sequence[Mosaic], settings: NADSettings, *, mosaic_size: int,
                         batch_size: int, device: str | torch.device | None = None) -> ArchitectureResult:
    """Path accuracy, hit rates (own paths and the shifted-path control), similarity and misclassification ranks."""
    accuracy = path_accuracy(model, paths, val_images, batch_size=batch_size, device=device)
    options = dict(mosaic_size=mosaic_size, top_fraction=settings.top_fraction,
                   quantize_uint8=settings.quantize_uint8, batch_size=batch_size, device=device)
    hits = hit_rates(model, paths, mosaic_source, mosaics, **options)
    control = hit_rates(model, paths, mosaic_source, mosaics, path_shift=1, **options)
    iou, empty = path_iou(paths.paths(), empty_value=settings.empty_iou)
    similarity = iou.mean(0)
    wrong = [(row.class_id, p) for row in accuracy.itertuples() for p in row.predicted
             if p != row.class_id and p in paths.classes]
    ranks = misclassification_ranks(similarity, paths.classes, [t for t, _ in wrong], [p for _, p in wrong]) \
        if wrong and len(paths.classes) >= 3 else np.zeros(0)
    misclassified = pd.DataFrame({"true": [t for t, _ in wrong], "predicted": [p for _, p in wrong], "rank": ranks})
    off_diagonal = ~torch.eye(len(paths.classes), dtype=torch.bool)
    return ArchitectureResult(arch, connection_family(model), paths, accuracy.drop(columns="predicted"), hits,
                              summarize_hit_rates(hits), summarize_hit_rates(control), similarity,
                              int(empty[:, off_diagonal].sum()) // 2, misclassified)


def _deep_hit(summary: pd.DataFrame, last: int = 3) -> tuple[float, float]:
    """Mean hit rate over the last `last` gate locations (the number `cam_2x2.py` prints) and its SE."""
    tail = summary.tail(last)
    se = (tail["hit_std"] / np.sqrt(tail["n_mosaics"])).to_numpy()
    return float(tail["hit_rate"].mean()), float(np.sqrt(np.sum(se ** 2)) / len(tail))


def _overall(holds: Sequence[bool]) -> str:
    return "confirmed" if all(holds) else ("refuted" if not any(holds) else "not confirmed")


def claim_rows(results: Mapping[str, ArchitectureResult], concepts: Mapping[str, pd.DataFrame] | None = None, *,
               chance: float = 0.25, max_accuracy_drop: float = 0.05, max_units_kept: float = 0.5) -> list[dict]:
    """Claims N1-N7 with our numbers and a verdict by the stated rule (spec section 2; rules [I]).

    N1/N3: per network, path accuracy within `max_accuracy_drop` of the original and fewer than
    `max_units_kept` of the units kept. N4: deep hit rate (last three locations) above `chance` by
    more than 2 SE and above the shifted-path control. N5: some network's largest dip is significant
    (`largest_dip`). N6: some pair of curves differs by more than twice the mean per-layer SE.
    N7: mean normalised rank of misclassified images above 0.5 by more than 2 SE (below: refuted).
    N2: diversity (1 - mean path similarity) differs between networks by more than twice the largest
    jackknife SE. All-network rules: 'confirmed' if every network passes, 'refuted' if none does.
    """
    rows, archs = [], list(results)

    def row(claim_id, ours, verdict, note=""):
        rows.append({"claim_id": claim_id, "ours": ours, "verdict": verdict, "note": note})

    n1 = {}
    for arch, r in results.items():
        drop = float((r.accuracy["original_accuracy"] - r.accuracy["path_accuracy"]).mean())
        kept = float(r.accuracy["units_kept"].mean())
        n1[arch] = (drop, kept, drop <= max_accuracy_drop and kept < max_units_kept)
    row("N1", "; ".join(f"{a}: acc drop {d:+.3f}, kept {k:.2f}" for a, (d, k, _) in n1.items()),
        _overall([h for *_, h in n1.values()]),
        f"rule: mean over classes, drop <= {max_accuracy_drop}, kept < {max_units_kept}")
    diversity = {a: (r.diversity, path_diversity_se(r.similarity)) for a, r in results.items()}
    spread = max(d for d, _ in diversity.values()) - min(d for d, _ in diversity.values())
    largest_se = max((s for _, s in diversity.values() if not math.isnan(s)), default=float("nan"))
    concept_text = ""
    if concepts:
        concept_text = "; distinct concepts per path " + ", ".join(
            f"{a}: {t['distinct_concepts'].mean():.1f}" for a, t in concepts.items())
    row("N2", "diversity " + ", ".join(f"{a}: {d:.3f}±{s:.3f}" for a, (d, s) in diversity.items()) + concept_text,
        "confirmed" if spread > 2 * largest_se else "inconclusive",
        "metric reconstructed [I]; rule: spread between networks > 2 x largest jackknife SE")
    row("N3", f"paths learned for {', '.join(f'{a} ({results[a].family})' for a in archs)}",
        _overall([n1[a][2] for a in archs]),
        "ConceptWorld instead of ImageNet/Places365; no NAS-cell (DARTS) network; rule: N1 per network")
    n4 = {}
    for arch, r in results.items():
        mean, se = _deep_hit(r.hit_summary)
        control, _ = _deep_hit(r.control_summary)
        n4[arch] = (mean, se, control, mean - chance > 2 * se and mean > control)
    row("N4", "; ".join(f"{a}: {m:.3f}±{s:.3f} (control {c:.3f})" for a, (m, s, c, _) in n4.items()),
        _overall([h for *_, h in n4.values()]), f"last three gate locations; chance {chance}")
    dips = {a: largest_dip(r.hit_summary) for a, r in results.items()}
    row("N5", "; ".join(f"{a}: drop {d['drop']:.3f} (layer {d['from_layer']}->{d['to_layer']}"
                        f"{', significant' if d['significant'] else ''})" for a, d in dips.items()),
        "confirmed" if any(d["significant"] for d in dips.values()) else "not confirmed",
        "rule: some network's hit rate falls significantly from a shallower to a deeper layer")
    distances, noise = {}, []
    for i, a in enumerate(archs):
        noise.append(float((results[a].hit_summary["hit_std"] / np.sqrt(results[a].hit_summary["n_mosaics"])).mean()))
        for b in archs[i + 1:]:
            distances[f"{a}/{b}"] = curve_distance(results[a].hit_summary, results[b].hit_summary)
    threshold = 2 * float(np.mean(noise)) if noise else float("nan")
    row("N6", "curve distance " + ", ".join(f"{k}: {v:.3f}" for k, v in distances.items()) + f" (2 SE = {threshold:.3f})",
        "confirmed" if distances and max(distances.values()) > threshold else "not confirmed",
        "rule: some pair of hit-rate curves (normalised depth) differs by more than 2 x mean per-layer SE")
    n7 = {}
    for arch, r in results.items():
        ranks = r.misclassification["rank"].to_numpy()
        if len(ranks) < 2:
            n7[arch] = (float("nan"), float("nan"), len(ranks), None)
            continue
        mean, se = float(ranks.mean()), float(ranks.std(ddof=1) / np.sqrt(len(ranks)))
        n7[arch] = (mean, se, len(ranks), mean - 0.5 > 2 * se if abs(mean - 0.5) > 2 * se else None)
    decided = [h for *_, h in n7.values() if h is not None]
    verdict = "inconclusive" if len(decided) < len(n7) else _overall(decided)
    row("N7", "; ".join(f"{a}: rank {m:.2f}±{s:.2f} (n={n})" for a, (m, s, n, _) in n7.items()), verdict,
        "rank of s(true, predicted) among s(true, .), 0.5 = chance; rule: |mean - 0.5| > 2 SE per network")
    return rows


def claim_results(results: Mapping[str, ArchitectureResult], concepts: Mapping[str, pd.DataFrame] | None,
                  reference: Mapping[str, Any], *, profile: str, seed: int) -> list[ClaimResult]:
    """The claims table of notebook 05: `claim_rows` with each claim's text and paper value from
    `reference` (`reporting.claims.load_reference`), a reduced-run note under every profile but
    `paper`, and the seed of the networks."""
    claims = {c["id"]: c for c in reference["claims"]}
    reduced = "" if profile == "paper" else f"REDUCED RUN ({profile}); "
    return [ClaimResult(claim_id=row["claim_id"], claim=claims[row["claim_id"]]["claim"], paper=claims[row["claim_id"]]["paper"],
                        ours=row["ours"], verdict=row["verdict"], note=reduced + row["note"],
                        seeds=f"seed {seed}, one network per arch")
            for row in claim_rows(results, concepts)]


def dissect_locations(model: nn.Module, locations: Sequence[GateLocation], dataset, *, quantile: float = 0.005,
                      iou_threshold: float = 0.04, batch_size: int = 64, device: str | torch.device | None = None,
                      feature_budget_bytes: int = 1 << 29) -> dict[str, pd.DataFrame]:
    """Network Dissection unit tables (label, iou, detector per channel) at every gate location, keyed by name.

    `analysis.features.dissect_layers` with locations for layers: one forward pass per group of
    locations whose features fit `feature_budget_bytes`.
    """
    dissections = dissect_layers(model, [loc.name for loc in locations], dataset, quantile=quantile,
                                 iou_threshold=iou_threshold, batch_size=batch_size, device=device,
                                 max_bytes=feature_budget_bytes)
    return {name: result.units for name, result in dissections.items()}


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def plot_hit_rates(results: Mapping[str, ArchitectureResult], *, chance: float = 0.25):
    """Hit rate against normalised depth per network (own paths solid, shifted-path control dashed)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    for index, (arch, r) in enumerate(results.items()):
        colour = f"C{index}"
        s = r.hit_summary
        ax.errorbar(s["depth"], s["hit_rate"], yerr=s["hit_std"] / np.sqrt(s["n_mosaics"]), color=colour,
                    marker="o", ms=3, capsize=2, label=f"{arch} ({r.family})")
        ax.plot(r.control_summary["depth"], r.control_summary["hit_rate"], color=colour, ls="--", lw=1)
    ax.axhline(chance, color="grey", lw=1, ls=":", label="chance")
    ax.set(xlabel="normalised depth of the gate location", ylabel="hit rate (mean ± SE over mosaics)",
           title="Class paths localise their class in 2x2 mosaics (dashed: another class's path)")
    ax.legend(fontsize=8)
    return fig


def plot_units_kept(results: Mapping[str, ArchitectureResult]):
    """Fraction of units on the class paths per gate location (mean over classes) against depth."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    for arch, r in results.items():
        kept = r.paths.units_kept().groupby("layer")["fraction"].agg(["mean", "std"])
        depth = kept.index / max(len(kept) - 1, 1)
        ax.errorbar(depth, kept["mean"], yerr=kept["std"], marker="o", ms=3, capsize=2, label=arch)
    ax.set(xlabel="normalised depth of the gate location", ylabel="fraction of units on the path",
           ylim=(0, 1), title="Path size per layer (mean ± std over classes)")
    ax.legend(fontsize=8)
    return fig


def plot_similarity(results: Mapping[str, ArchitectureResult], names: Sequence[str], order: Sequence[int]):
    """Path-similarity heat maps, classes in `order` (rows of the PathSet) labelled by `names`."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results) + 1.5, 4.4), squeeze=False)
    labels = [names[i] for i in order]
    for index, (ax, (arch, r)) in enumerate(zip(axes[0], results.items())):
        matrix = r.similarity[list(order)][:, list(order)].numpy()
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(arch, fontsize=9)
        ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(order)), labels if index == 0 else [], fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.7, label="path similarity (mean IoU)")
    return fig

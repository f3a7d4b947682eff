"""NAD's path search: per-class gate logits learned on a frozen network (spec sections 3 and 4).

`find_paths_sequential` is the official one-class-after-another loop, kept as the reference;
`search_paths` learns all classes of a chunk in one batched computation (the same result within float
tolerance). Both return a `PathSet`. The backbone must be in eval mode (frozen BatchNorm statistics):
only then is every sample's output independent of the rest of the batch, which is what makes the
batched search equal the sequential one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from replication import io
from replication.methods.gated_paths.gates import GATE_FUNCTIONS, GateHooks, GateLocation, gate_values, gated
from replication.models.anatomy import FAMILY_OF_ARCH, FAMILY_OF_PRETRAINED
from replication.models.surgery import fold_batchnorm, frozen
from replication.runtime import progress, resolve_device

SEEDINGS = ("per_class", "sequential")
TRACE_COLUMNS = ["class_id", "epoch", "steps", "loss", "flip_rate", "init_agreement", "units_kept"]
ORIGINAL_CACHE_BYTES = 2 * 2**30  # search_paths keeps the original outputs of a class chunk up to this size


# Sparsity weight beta from the comment table of the official `findpath.py` (spec section 3.3) [C].
OFFICIAL_BETA = {
    "imagenet": {"vgg16": 4.5, "resnet50": 0.02, "densenet121": 0.02, "darts": 0.45},
    "places365": {"vgg16": 5.0, "resnet50": 0.02, "densenet121": 0.02, "darts": 0.20},
}
# The official architecture whose beta a project architecture inherits (same connection type) [I]. The
# official NAS network is DARTS-V2, so a NAS-derived EfficientNet takes the `darts` column [I].
BETA_ARCH_OF_FAMILY = {"plain": "vgg16", "residual": "resnet50", "dense": "densenet121", "nas": "darts"}
_FAMILY_OF_NAME = {**FAMILY_OF_ARCH, **FAMILY_OF_PRETRAINED}


def official_beta(arch: str, dataset: str = "imagenet") -> float:
    """beta for `arch` (a backbone or a pretrained network's name): the official value, or that of the
    official network with the same connection type."""
    if dataset not in OFFICIAL_BETA:
        raise ValueError(f"unknown dataset {dataset!r} for beta; choose one of {sorted(OFFICIAL_BETA)}")
    table = OFFICIAL_BETA[dataset]
    if arch in table:
        return table[arch]
    if arch not in _FAMILY_OF_NAME:
        raise ValueError(f"no beta known for architecture {arch!r}; pass beta explicitly or use one of "
                         f"{sorted(set(table) | set(_FAMILY_OF_NAME))}")
    return table[BETA_ARCH_OF_FAMILY[_FAMILY_OF_NAME[arch]]]


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

    Stopping [I]: with `stop_flip_rate` None every class runs `epochs` epochs (the official fixed
    schedule). Otherwise `epochs` is the cap and a class stops once, for `stop_patience` epochs in a
    row, fewer than `stop_flip_rate` of its path decisions (gate signs) flipped in the epoch, and it has
    run at least `min_epochs`. Each class stops on its own, so a class's path does not depend on
    which classes are searched with it.
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
    stop_flip_rate: float | None = None
    stop_patience: int = 3
    min_epochs: int = 0

    def __post_init__(self) -> None:
        if self.seeding not in SEEDINGS:
            raise ValueError(f"seeding must be one of {SEEDINGS}, not {self.seeding!r}")
        if self.gate_function not in GATE_FUNCTIONS:
            raise ValueError(f"gate_function must be one of {GATE_FUNCTIONS}, not {self.gate_function!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0; got {self.epochs}, "
                             f"{self.batch_size}, {self.lr}")
        if self.stop_flip_rate is not None and not (0 < self.stop_flip_rate < 1 and self.stop_patience >= 1):
            raise ValueError(f"stop_flip_rate must lie in (0, 1) with stop_patience >= 1 (or be None for the fixed "
                             f"schedule); got {self.stop_flip_rate}, {self.stop_patience}")


@dataclass
class PathSet:
    """Learned gate logits of several classes: `logits[l]` is (K, C_l), row k for `classes[k]`, and
    the search's `trace` (one row per class and epoch, `TRACE_COLUMNS`; empty when not recorded)."""

    classes: list[int]
    locations: list[GateLocation]
    logits: list[torch.Tensor]
    config: dict[str, Any]
    trace: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TRACE_COLUMNS))

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
                                    "config": dict(self.config), "trace": self.trace.to_dict("list")})

    @classmethod
    def load(cls, path: str | Path) -> "PathSet":
        data = io.load_torch(path)
        trace = pd.DataFrame(data.get("trace") or {c: [] for c in TRACE_COLUMNS})
        return cls(list(data["classes"]), [GateLocation(**loc) for loc in data["locations"]],
                   list(data["logits"]), dict(data["config"]), trace)

    def subset(self, classes: Sequence[int]) -> "PathSet":
        """The paths (and trace rows) of `classes` only, in that order."""
        rows = [self.row(c) for c in classes]
        return PathSet(list(classes), list(self.locations), [m[rows] for m in self.logits], dict(self.config),
                       self.trace[self.trace["class_id"].isin(classes)].reset_index(drop=True))

    def init_agreement(self) -> pd.DataFrame:
        """Per class: the share of its path decisions (m > 0) equal to those of its random initial
        logits, overall and per location: 0.5 is a search that forgot its start, 1.0 one that never left it."""
        inits = _class_plans(self.classes, [0] * len(self.classes), self.locations,
                             PathSearchConfig(**{**self.config, "epochs": 0}))
        rows = []
        for k, class_id in enumerate(self.classes):
            same = [((m[k] > 0) == (plan > 0)).float() for m, plan in zip(self.logits, inits[k].init)]
            rows.append({"class_id": class_id, "agreement": float(torch.cat(same).mean()),
                         **{loc.name: float(v.mean()) for loc, v in zip(self.locations, same)}})
        return pd.DataFrame(rows)


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


@dataclass
class _Resume:
    """Where a search of some classes goes on from: their gate logits (K, C_l) per location at the end
    of epoch `first_epoch` (0 = not yet started) and the stopping rule's count of calm epochs (K,)."""

    logits: list[torch.Tensor]
    first_epoch: int
    calm: torch.Tensor


def _rule_state(trace: pd.DataFrame, config: PathSearchConfig) -> pd.DataFrame:
    """Per class of a search's `trace` (index class_id): its last epoch, the stopping rule's count of
    calm epochs in a row at its end (flip rate below `stop_flip_rate`, compared in float32 as
    `_EpochTracker` does; 0 for a fixed schedule) and whether the rule stopped it."""
    rows = {}
    for class_id, epochs in trace.sort_values("epoch").groupby("class_id"):
        calm = 0
        if config.stop_flip_rate is not None:
            for rate in epochs["flip_rate"]:
                calm = calm + 1 if bool(torch.tensor(rate, dtype=torch.float32) < config.stop_flip_rate) else 0
        last = int(epochs["epoch"].iloc[-1])
        rows[class_id] = {"last_epoch": last, "calm": calm,
                          "stopped": calm >= config.stop_patience and last >= config.min_epochs}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["last_epoch", "calm", "stopped"])


def stopped_by_rule(trace: pd.DataFrame, config: PathSearchConfig | Mapping[str, Any]) -> pd.Series:
    """Per class of a search's `trace`: whether the stopping rule stopped it (False for every class of a
    fixed schedule, and for a class the epoch cap stopped first)."""
    config = config if isinstance(config, PathSearchConfig) else PathSearchConfig(**config)
    return _rule_state(trace, config)["stopped"].astype(bool).rename("stopped_by_rule")


class _EpochTracker:
    """Per-class bookkeeping of a search, shared by both loops: the trace rows (mean loss of the
    epoch's steps, share of path decisions flipped in the epoch, agreement with the initial decisions,
    units kept) and the stopping rule of `PathSearchConfig`; `running` says which classes still step."""

    def __init__(self, classes: Sequence[int], init: Sequence[torch.Tensor], config: PathSearchConfig,
                 resume: _Resume | None = None):
        self.classes, self.config = list(classes), config
        self.initial = [m.cpu() > 0 for m in init]
        self.previous = self.initial if resume is None else [m.cpu() > 0 for m in resume.logits]
        self.running = torch.ones(len(classes), dtype=torch.bool)
        self.calm = torch.zeros(len(classes), dtype=torch.long) if resume is None else resume.calm.clone()
        self.loss = torch.zeros(len(classes), dtype=torch.float64)
        self.steps = torch.zeros(len(classes), dtype=torch.long)
        self.rows: list[dict[str, Any]] = []

    def add_step(self, losses: torch.Tensor, stepping: torch.Tensor) -> None:
        """Record one step's per-class losses (K,) for the classes `stepping` (K,) bool."""
        stepping = stepping.cpu()
        self.loss += torch.where(stepping, losses.detach().cpu().double(), 0.0)
        self.steps += stepping.long()

    def end_epoch(self, epoch: int, logits: Sequence[torch.Tensor]) -> None:
        """Close epoch `epoch` (0-based) with the current gate logits (K, C_l) per location."""
        signs = [m.detach().cpu() > 0 for m in logits]
        units = sum(s.shape[1] for s in signs)
        flips = sum((s != p).sum(1) for s, p in zip(signs, self.previous)) / units
        agreement = sum((s == i).sum(1) for s, i in zip(signs, self.initial)) / units
        kept = sum(s.sum(1) for s in signs) / units
        for k in torch.nonzero(self.running).flatten().tolist():
            self.rows.append({"class_id": self.classes[k], "epoch": epoch + 1, "steps": int(self.steps[k]),
                              "loss": float(self.loss[k] / max(int(self.steps[k]), 1)), "flip_rate": float(flips[k]),
                              "init_agreement": float(agreement[k]), "units_kept": float(kept[k])})
        self.previous, self.loss, self.steps = signs, torch.zeros_like(self.loss), torch.zeros_like(self.steps)
        if self.config.stop_flip_rate is not None:
            self.calm = torch.where(flips < self.config.stop_flip_rate, self.calm + 1, 0)
            self.running &= ~((self.calm >= self.config.stop_patience) & (epoch + 1 >= self.config.min_epochs))

    def trace(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=TRACE_COLUMNS)


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
    learned, traces = [], []
    with frozen(model), gated(model, locations) as hooks:
        for class_id, plan in progress(list(zip(classes, plans)), desc="paths (sequential)"):
            gate_logits = [m.to(device).requires_grad_(True) for m in plan.init]
            tracker = _EpochTracker([class_id], [m[None] for m in plan.init], config)
            images = class_images[class_id]
            for epoch, order in enumerate(plan.orders):
                if not tracker.running.any():
                    break
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
                    tracker.add_step(loss[None], torch.ones(1, dtype=torch.bool))
                    with torch.no_grad():
                        for m, g in zip(gate_logits, grads):
                            _normalised_step(m, g, config)
                tracker.end_epoch(epoch, [m[None] for m in gate_logits])
            learned.append([m.detach().cpu() for m in gate_logits])
            traces.append(tracker.trace())
    logits = [torch.stack([per_class[l] for per_class in learned]) for l in range(len(locations))]
    return PathSet(classes, list(locations), logits, asdict(config), pd.concat(traces, ignore_index=True))


def _segment_mean(values: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-row weighted mean of per-sample `values` (0 for rows with no weight)."""
    total = values.new_zeros(n_rows).index_add(0, rows, values * weights)
    count = values.new_zeros(n_rows).index_add(0, rows, weights)
    return total / count.clamp_min(1)


class _SampleSquaredError(torch.autograd.Function):
    """||output - target||^2 per sample (over all dims but the first); `target` takes no gradient.

    One pass over the difference each way, with no full-size temporary: the difference is written
    over `target` (pass one that is not needed afterwards) and the backward scales it in place (so it
    runs once: no `retain_graph`). Autograd's own `square().mean()` takes three passes and two temporaries.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        difference = torch.sub(output, target, out=target)
        ctx.save_for_backward(difference)
        return torch.linalg.vector_norm(difference, dim=tuple(range(1, difference.dim()))).square()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (difference,) = ctx.saved_tensors
        return difference.mul_((2 * grad).view(-1, *[1] * (difference.dim() - 1))), None


def _sample_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of each sample (dim 0); overwrites `target` (`_SampleSquaredError`)."""
    return _SampleSquaredError.apply(output, target) / output[0].numel()


def _rows(value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`value[index]` (dim 0) in `value`'s memory format, copied row by row (`index_select`; on a
    channels-last tensor through its storage order, where `value[index]` takes a slower path)."""
    if value.dim() == 4 and not value.is_contiguous() and value.is_contiguous(memory_format=torch.channels_last):
        rows = torch.empty(len(index), *value.shape[1:], dtype=value.dtype, device=value.device,
                           memory_format=torch.channels_last)
        torch.index_select(value.permute(0, 2, 3, 1), 0, index, out=rows.permute(0, 2, 3, 1))
        return rows
    return value.index_select(0, index)


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
def _original_outputs(model: nn.Module, hooks: GateHooks, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                      device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The original net's outputs at every gate location, and whether it classifies each image as its label."""
    hooks.set(None)
    outputs: dict[str, list[torch.Tensor]] = {}
    correct = []
    for start in range(0, len(images), batch_size):
        correct.append(model(images[start:start + batch_size].to(device)).argmax(1) == labels[start:start + batch_size])
        for name, value in hooks.outputs.items():
            outputs.setdefault(name, []).append(value)
    return {name: values[0] if len(values) == 1 else torch.cat(values) for name, values in outputs.items()}, \
        torch.cat(correct)


def _search_chunk(model: nn.Module, locations: Sequence[GateLocation], class_images: Mapping[int, torch.Tensor],
                  classes: Sequence[int], plans: Sequence[_ClassPlan], config: PathSearchConfig,
                  device: torch.device, cache_original: bool, memory_format: torch.memory_format,
                  resume: _Resume | None = None) -> tuple[list[torch.Tensor], pd.DataFrame]:
    """Learn the gates of `classes` together: the batch holds (class, image) pairs, gates indexed per sample.

    The chunk's images are pooled in one tensor; a step gathers its batch from it by `index`.
    `cache_original`: run the original net once per image and keep its outputs (the images are fixed
    tensors, so they are the same every epoch) instead of once per step as the official loop does.
    `memory_format`: the layout `model` runs fastest in (`search_copy`). `resume`: go on from those
    logits after epoch `resume.first_epoch` instead of starting from the plans' initial ones.
    """
    n_classes, n_layers, bs = len(classes), len(locations), config.batch_size
    init = [torch.stack([plan.init[l] for plan in plans]) for l in range(n_layers)]
    start = init if resume is None else resume.logits
    gate_logits = [m.detach().clone().to(device).requires_grad_(True) for m in start]
    sizes = torch.tensor([len(class_images[c]) for c in classes])
    first_image = (sizes.cumsum(0) - sizes).tolist()
    images = torch.cat([class_images[c] for c in classes]).contiguous(memory_format=memory_format)
    image_rows = torch.repeat_interleave(torch.arange(n_classes), sizes).to(device)
    image_labels = torch.tensor(classes, device=device)[image_rows]
    tracker = _EpochTracker(classes, init, config, resume)
    with frozen(model), gated(model, locations) as hooks:
        if cache_original:
            cached_outputs, cached_correct = _original_outputs(model, hooks, images, image_labels, max(bs, 256), device)
        first_epoch = 0 if resume is None else resume.first_epoch
        for epoch in progress(range(first_epoch, config.epochs), desc=f"search epochs ({n_classes} classes)"):
            if not tracker.running.any():
                break
            orders = [first + plan.orders[epoch] for first, plan, running
                      in zip(first_image, plans, tracker.running.tolist()) if running]
            for step in range(max(math.ceil(len(order) / bs) for order in orders)):
                index = torch.cat([order[step * bs:(step + 1) * bs] for order in orders]).to(device)
                rows, labels = image_rows[index], image_labels[index]
                x = images[index.to(images.device)].to(device)
                if cache_original:
                    correct = cached_correct[index]
                else:
                    hooks.set(None)
                    with torch.no_grad():
                        correct = model(x).argmax(1) == labels
                    original = dict(hooks.outputs)
                stepping = torch.zeros(n_classes, dtype=torch.bool, device=device)
                stepping[rows] = True
                if config.skip_batches_without_correct:
                    stepping &= torch.zeros(n_classes, device=device).index_add(0, rows, correct.float()) > 0
                    keep = stepping[rows]
                    if not keep.any():
                        continue
                    if not keep.all():
                        index, x, rows, labels, correct = index[keep], x[keep], rows[keep], labels[keep], correct[keep]
                        if not cache_original:
                            original = {name: value[keep] for name, value in original.items()}
                if cache_original:
                    original = {name: _rows(value, index) for name, value in cached_outputs.items()}
                hooks.set([gate_values(m, config.gate_function) for m in gate_logits], rows)
                logits = model(x)
                ones = torch.ones_like(correct, dtype=logits.dtype)
                ce = _segment_mean(F.cross_entropy(logits, labels, reduction="none"), rows, ones, n_classes)
                weights = correct.to(logits.dtype) if config.mse_on_correct_only else ones
                mse = _segment_mean(sum(_sample_mse(hooks.outputs[name], original[name]) for name in original),
                                    rows, weights, n_classes)
                del original  # now the differences, which the backward turns into gradients in place
                act = (ce + mse) / n_layers if config.divide_ce_by_layers else ce + mse / n_layers
                sparsity = sum(torch.sigmoid(m).pow(2).mean(1) for m in gate_logits) / n_layers
                losses = act + config.beta * sparsity
                grads = torch.autograd.grad((losses * stepping).sum(), gate_logits)
                tracker.add_step(losses, stepping)
                with torch.no_grad():
                    for m, g in zip(gate_logits, grads):
                        _normalised_step(m, g, config, stepping)
            tracker.end_epoch(epoch, gate_logits)
    return [m.detach().cpu() for m in gate_logits], tracker.trace()


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
    plans = _class_plans(classes, [len(class_images[c]) for c in classes], locations, config)
    logits, trace = _search_classes(model, locations, class_images, classes, plans, config, device, class_chunk,
                                    original_cache_bytes, resume=None)
    return PathSet(classes, list(locations), logits, asdict(config), trace)


def extend_search(model: nn.Module, locations: Sequence[GateLocation], class_images: Mapping[int, torch.Tensor],
                  previous: PathSet, *, config: PathSearchConfig, device: str | torch.device | None = None,
                  class_chunk: int | None = None, original_cache_bytes: int = ORIGINAL_CACHE_BYTES) -> PathSet:
    """`previous` (a search with the same configuration but a lower epoch cap) continued up to
    `config.epochs`: equal (within float tolerance) to `search_paths` with `config`, at the cost of the
    new epochs only.

    The classes that were still running at `previous`'s cap (the stopping rule had not stopped them)
    go on from their logits, with the image orders `search_paths` draws for those epochs (per-class
    seeding draws every class's orders from its own generator, so a longer cap leaves the first epochs'
    draws unchanged); the other classes keep their paths and trace.
    """
    before = PathSearchConfig(**previous.config)
    if config.seeding != "per_class":
        raise ValueError(f"extend_search needs seeding='per_class' (with {config.seeding!r} seeding a longer cap changes "
                         "the draws of later classes); run search_paths with the new cap instead")
    if dataclasses.replace(before, epochs=config.epochs) != config or before.epochs > config.epochs:
        raise ValueError(f"extend_search continues a search up to a higher epoch cap and nothing else: the previous search "
                         f"ran {before} but the extension asks for {config}")
    if [asdict(loc) for loc in previous.locations] != [asdict(loc) for loc in locations]:
        raise ValueError("extend_search got other gate locations than the search it continues")
    classes = _check_inputs(model, class_images, previous.classes, config)
    state = _rule_state(previous.trace, before).reindex(classes, fill_value=0)  # a class without rows: not started
    going_on = [c for c in classes if state.at[c, "last_epoch"] == before.epochs and not state.at[c, "stopped"]]
    if before.epochs == config.epochs or not going_on:
        return PathSet(classes, list(locations), list(previous.logits), asdict(config), previous.trace)
    rows = [previous.row(c) for c in going_on]
    resume = _Resume([m[rows] for m in previous.logits], before.epochs,
                     torch.tensor(state.loc[going_on, "calm"].tolist(), dtype=torch.long))
    plans = _class_plans(going_on, [len(class_images[c]) for c in going_on], locations, config)
    logits, added = _search_classes(model, locations, class_images, going_on, plans, config, device, class_chunk,
                                    original_cache_bytes, resume=resume)
    merged = [m.clone() for m in previous.logits]
    for l, m in enumerate(logits):
        merged[l][rows] = m
    trace = pd.concat([previous.trace, added], ignore_index=True).sort_values(["class_id", "epoch"], kind="stable")
    return PathSet(classes, list(locations), merged, asdict(config), trace.reset_index(drop=True))


def _search_classes(model: nn.Module, locations: Sequence[GateLocation], class_images: Mapping[int, torch.Tensor],
                    classes: Sequence[int], plans: Sequence[_ClassPlan], config: PathSearchConfig,
                    device: str | torch.device | None, class_chunk: int | None, original_cache_bytes: int,
                    resume: _Resume | None) -> tuple[list[torch.Tensor], pd.DataFrame]:
    """The batched search of `classes` in chunks of `class_chunk` (see `search_paths`), from their
    initial logits or from `resume`; returns the logits (K, C_l) per location and the trace."""
    device = resolve_device(device)
    model, memory_format = search_copy(model, locations)
    chunk = class_chunk or len(classes)
    parts = []
    for start in progress(range(0, len(classes), chunk), desc="paths (batched)"):
        members = slice(start, start + chunk)
        part_resume = None if resume is None else _Resume([m[members] for m in resume.logits], resume.first_epoch,
                                                          resume.calm[members])
        cache_original = _original_bytes(locations, sum(len(class_images[c]) for c in classes[members])) \
            <= original_cache_bytes
        parts.append(_search_chunk(model, locations, class_images, classes[members], plans[members], config,
                                   device, cache_original, memory_format, part_resume))
    logits = [torch.cat([part[0][l] for part in parts]) for l in range(len(locations))]
    return logits, pd.concat([part[1] for part in parts], ignore_index=True)

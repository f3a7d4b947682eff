"""One training loop for every notebook: pluggable loss terms and step callbacks, per-epoch metrics,
resumable and cached behind a recipe.

Seams for the papers: a `LossTerm` adds to the loss; a `StepCallback` changes the model after an
optimiser step where no loss can (concept whitening's rotation every k steps); a `Recipe` says what
`train_cached` builds (after seeding, so initial weights are reproducible), with which terms and
callbacks, and what identifies it in the cache.

Determinism and resume: every epoch starts by seeding Python, NumPy, torch (CPU and CUDA) and the
shuffling generator from `(config.seed, epoch)`, so an epoch's randomness (order, dropout, loss-term
sampling) depends on nothing that happened before it. A checkpoint written atomically after each
epoch holds the model, optimiser, schedule, AMP scaler and metric history; a run killed at any point
restarts from the last finished epoch and ends bit-identical (on CPU) to an uninterrupted run.

Data parallelism (optional): a process started by torchrun, or a `TrainConfig(distributed=True)` run
inside a process group the caller initialised, trains a `DistributedDataParallel` copy per process.
`batch_size` stays the global batch (each of N processes takes batch_size / N), every rank shuffles
with the single-process permutation and takes every N-th position of it, so the ranks' batches
together are the single-process batches; metrics are summed over ranks; only rank 0 writes files.
Single-process training (the default) touches nothing of torch.distributed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset, TensorDataset

from replication import cache, io, runtime
from replication.models.backbones import load_weights
from replication.models.hooks import capture_activations
from replication.models.surgery import eval_mode
from replication.training import distributed

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "none")
AUGMENTATIONS = ("none", "flip_crop")
CHECKPOINT_NAME = "last.pt"
HISTORY_NAME = "history.csv"
MODEL_NAME = "model.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the model's own settings live in its config (e.g. `BackboneConfig`).

    `schedule`: "cosine" anneals the lr to 0 over `epochs`; "step" multiplies it by `gamma` every
    `step_size` epochs (the CGL code's 0.1 every 30); "none" keeps it constant. Schedules step per epoch.
    `optimizer` "adam" adds `weight_decay` as an L2 term (torch's Adam). `augment` "flip_crop": every
    training image is flipped left-right with probability 1/2 and cropped back to its size after
    zero-padding by `crop_padding` pixels (zero = the normalised mean colour), drawn from the epoch's
    own generator, so augmentation never shifts the shuffle order or any other random draw.
    `distributed`: train data-parallel in the process group the caller initialised (a torchrun launch
    always does, whatever this says); it is no part of cache keys (the world size is, when above 1).
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    label_smoothing: float = 0.0
    seed: int = 0
    amp: bool = False
    num_workers: int = 0
    augment: str = "none"
    crop_padding: int = 4
    distributed: bool = field(default=False, metadata={"cache_key": False})

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer={self.optimizer!r}; choose one of {OPTIMIZERS}.")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"TrainConfig.augment={self.augment!r}; choose one of {AUGMENTATIONS}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule={self.schedule!r}; choose one of {SCHEDULES}.")
        for name in ("epochs", "batch_size", "step_size", "seed", "num_workers", "crop_padding"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"TrainConfig.{name} must be an integer, got {value!r}.")
        for name in ("epochs", "batch_size", "step_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.crop_padding < 0:
            raise ValueError(f"TrainConfig.crop_padding must be >= 0, got {self.crop_padding}.")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}.")


@runtime_checkable
class LossTerm(Protocol):
    """An extra loss added to the task cross-entropy (the papers' regularisers plug in here).

    `layers` names the modules whose outputs the term reads; they arrive in `activations` with their
    autograd graph. The returned scalar is already weighted. A term may also define
    `decay_free_parameters(model) -> list[Parameter]` for parameters that must get no weight decay
    (e.g. because the term replaces it). Parameters a term learns must belong to the model.
    A term with `reads_targets = True` is called with `targets=` too: `{"labels": class ids, **extras}`,
    where a training sample may be `(image, class_id, extras)` with `extras` a dict of tensors (e.g. LAP's
    evidence masks, 1 × H × W: flipped and cropped with their image under `augment = "flip_crop"`).
    The captured outputs are copies, safe from later in-place ops of the forward pass, unless every
    term sets `clone_captured = False` (it then checks `tensor._version` itself and raises when an
    output was modified): on large maps the copies cost a noticeable share of a step.
    """

    name: str
    layers: tuple[str, ...]

    def __call__(self, model: nn.Module, activations: Mapping[str, torch.Tensor]) -> torch.Tensor: ...


@runtime_checkable
class StepCallback(Protocol):
    """An update after every optimiser step that a loss term cannot express (e.g. a rotation every k steps).

    Called as `callback(model, step=..., epoch=...)` under `torch.no_grad()`, right after the
    optimiser step: `step` counts optimiser steps from 1 across epochs, `epoch` counts epochs from 1.
    It must be deterministic (the global RNGs are seeded per epoch, so drawing from them is) and keep
    any state in the model (buffers), so a resumed run and a cached model see the same thing. Like a
    loss term's, its settings (all fields of a dataclass, else its `name`) are part of the checkpoint
    and cache identity.
    """

    name: str

    def __call__(self, model: nn.Module, *, step: int, epoch: int) -> None: ...


class Recipe(Protocol):
    """What `train_cached` trains: it seeds with `TrainConfig.seed`, then calls `build()`, then
    `loss_terms(model)` and `step_callbacks(model)` on the built model, so every paper's initial
    weights (and anything the terms register in the model) are reproducible.

    `key(model)` is the recipe's part of the cache key, e.g. `{"model": ..., "loss": ...}`: everything
    that decides what is built and what is added to the loss (the model is passed for keys derived
    from its structure, such as the layers a loss term reads). `train_cached` adds the training
    config, the data fingerprints and the compute identity, and the step callbacks' settings.
    Subclass it (dataclasses do well) and override `loss_terms` / `step_callbacks` when needed.
    """

    def build(self) -> nn.Module: ...

    def key(self, model: nn.Module) -> dict[str, Any]: ...

    def loss_terms(self, model: nn.Module) -> Sequence[LossTerm]:
        return ()

    def step_callbacks(self, model: nn.Module) -> Sequence[StepCallback]:
        return ()


@dataclass
class TrainResult:
    model: nn.Module
    history: pd.DataFrame  # one row per epoch


def train(
    model: nn.Module,
    train_set: Dataset,
    *,
    config: TrainConfig,
    val_set: Dataset | None = None,
    loss_terms: Sequence[LossTerm] = (),
    step_callbacks: Sequence[StepCallback] = (),
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """Train `model` in place on `(image, class_id)` samples; resume from `checkpoint_dir` if it has a checkpoint.

    History columns: epoch, train_loss (task cross-entropy), `loss_<name>` per term, train_acc,
    val_loss, val_acc (NaN without `val_set`), lr, seconds, seed. Each epoch re-seeds the global
    Python/NumPy/torch RNGs from `(config.seed, epoch)`; the model's initialisation is the caller's
    (seed before building it, as `train_cached` does). `step_callbacks` run after every optimiser
    step (see `StepCallback`).
    """
    device = runtime.resolve_device(device)
    if config.amp and device.type != "cuda":
        raise ValueError(f"TrainConfig.amp=True needs CUDA but device is {device}; set amp=False.")
    _check_terms(loss_terms)
    _check_callbacks(step_callbacks)
    if len(train_set) == 0:
        raise ValueError("train() got an empty train_set; pass at least one (image, class_id) sample.")
    group = distributed.join_process_group(config.distributed, device)
    if group is not None:
        device = distributed.rank_device(device)
        distributed.per_rank_batch(config.batch_size, group.world_size)
    model.to(device)
    optimizer = _optimizer(model, config, loss_terms)
    schedule = _schedule(optimizer, config)
    amp_dtype = torch.bfloat16 if config.amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and amp_dtype == torch.float16)
    identity = {"config": cache.canonical(config), "loss_terms": [_identity(t) for t in loss_terms],
                **_callback_identity(step_callbacks), **distributed.parallel_identity(group)}
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    history: list[dict[str, Any]] = []
    if checkpoint is not None and checkpoint.exists():
        history = _restore(checkpoint, identity, model, optimizer, schedule, scaler)
    # the module whose forward trains: a DDP wrapper (gradients averaged over ranks) or the model itself
    network = model if group is None else distributed.data_parallel(model, device)

    with _deterministic(device):
        for epoch in range(len(history), config.epochs):
            started = time.perf_counter()
            generators = _seed_epoch(config.seed, epoch, rank=group.rank if group is not None else 0)
            lr = optimizer.param_groups[0]["lr"]
            row = _train_epoch(model, network, train_set, optimizer, scaler, loss_terms, step_callbacks, config, device,
                               generators, epoch, amp_dtype, group)
            if schedule is not None:
                schedule.step()
            if group is None:
                val = evaluate(model, val_set, batch_size=config.batch_size, device=device, num_workers=config.num_workers) if val_set is not None else {}
            else:
                distributed.broadcast_buffers(model)  # BatchNorm statistics: rank 0's everywhere, as in the model rank 0 saves
                val = _evaluate_sharded(model, val_set, config, device, group) if val_set is not None else {}
            row.update(val_loss=val.get("loss", math.nan), val_acc=val.get("accuracy", math.nan), lr=lr)
            row.update(seconds=time.perf_counter() - started, seed=config.seed)
            history.append({"epoch": epoch + 1, **row})
            if checkpoint is not None and (group is None or group.rank == 0):
                state = {
                    "identity": identity,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict() if schedule is not None else {},
                    "scaler": scaler.state_dict(),
                    "history": history,
                }
                io.save_torch(checkpoint, state)
                io.write_csv(checkpoint.parent / HISTORY_NAME, pd.DataFrame(history))
    return TrainResult(model=model, history=pd.DataFrame(history))


def evaluate(
    model: nn.Module, dataset: Dataset, *, batch_size: int, device: str | torch.device | None = None, num_workers: int = 0
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of `model` (in eval mode) over `(image, class_id)` samples."""
    device = runtime.resolve_device(device)
    return _evaluation_metrics(_evaluation_totals(model, dataset, batch_size, device, num_workers))


def _evaluation_totals(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, num_workers: int) -> torch.Tensor:
    """Loss sum, correct count and sample count (float64, on `device`) of `model` in eval mode over `dataset`."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    with eval_mode(model), torch.no_grad():
        for images, labels in runtime.progress(loader, desc="evaluate", total=len(loader)):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model(images).float()
            totals += torch.stack([
                nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
                (logits.argmax(1) == labels).sum().double(),
                torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
            ])
    return totals


def _evaluation_metrics(totals: torch.Tensor) -> dict[str, float]:
    loss_sum, correct, count = totals.tolist()
    if count == 0:
        raise ValueError("evaluate() got an empty dataset; pass at least one (image, class_id) sample.")
    return {"loss": loss_sum / count, "accuracy": correct / count, "n": int(count)}


def _evaluate_sharded(model: nn.Module, dataset: Dataset, config: TrainConfig, device: torch.device,
                      group: distributed.ProcessGroup) -> dict[str, float]:
    """`evaluate` over every rank's share (positions rank, rank + N, ...: no sample twice), summed over ranks."""
    share = Subset(dataset, range(group.rank, len(dataset), group.world_size))
    totals = _evaluation_totals(model, share, config.batch_size, device, config.num_workers)
    dist.all_reduce(totals)
    return _evaluation_metrics(totals)


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, *, batch_size: int,
            device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, logits) of `model` (in eval mode) over `(image, class_id)` samples, on the CPU."""
    device = runtime.resolve_device(device)
    labels, logits = [], []
    with eval_mode(model):
        for images, batch_labels in runtime.progress(DataLoader(dataset, batch_size=batch_size), desc="predict"):
            logits.append(model(images.to(device)).float().cpu())
            labels.append(torch.as_tensor(batch_labels))
    if not labels:
        raise ValueError("predict() got an empty dataset; pass at least one (image, class_id) sample.")
    return torch.cat(labels), torch.cat(logits)


def train_cached(
    kind: str,
    recipe: Recipe,
    train_set: Dataset,
    *,
    config: TrainConfig,
    val_set: Dataset | None = None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """`train` behind the configuration cache: a finished model is loaded from disk, not retrained.

    Seeds everything with `config.seed`, then builds the recipe's model, loss terms and step
    callbacks (see `Recipe`), so initial weights are reproducible. The folder
    `cache.stage_dir(kind, key)` is keyed by `recipe.key(model)`, `config`, the datasets'
    fingerprints, `runtime.compute_identity` (the CPU thread count, which changes float results) and
    the step callbacks' settings (when there are any). It holds `model.pt` (state dict),
    `history.csv` and the DONE marker; an unfinished run resumes from its checkpoints.
    """
    runtime.seed_everything(config.seed)
    model = recipe.build()
    loss_terms, step_callbacks = tuple(recipe.loss_terms(model)), tuple(recipe.step_callbacks(model))
    group = distributed.join_process_group(config.distributed, runtime.resolve_device(device))
    key = {
        **recipe.key(model),
        "train": config,
        "train_data": dataset_fingerprint(train_set),
        "val_data": dataset_fingerprint(val_set) if val_set is not None else None,
        **runtime.compute_identity(device),
        **_callback_identity(step_callbacks),
        **distributed.parallel_identity(group),
    }
    folder = cache.stage_dir(kind, key)
    main = group is None or group.rank == 0
    # another notebook training the same model: wait and load it (rank 0 locks and decides for its group)
    with cache.stage_lock(folder) if main else contextlib.nullcontext():
        done = cache.is_done(folder) if main else None
        if group is not None:
            done = distributed.from_rank_zero(done)  # the other ranks wait here for rank 0's lock and answer
        if done:
            load_weights(model, folder / MODEL_NAME)
            return TrainResult(model=model.to(runtime.resolve_device(device)), history=pd.read_csv(folder / HISTORY_NAME))
        result = train(
            model, train_set, config=config, val_set=val_set, loss_terms=loss_terms, step_callbacks=step_callbacks,
            device=device, checkpoint_dir=folder / "checkpoints",
        )
        if main:
            io.save_torch(folder / MODEL_NAME, result.model.state_dict())
            io.write_csv(folder / HISTORY_NAME, result.history)
            cache.mark_done(folder, key)
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # superseded by model.pt
        if group is not None:
            dist.barrier()  # no rank goes on before the cache folder is complete
    return result


def dataset_fingerprint(dataset: Dataset) -> Any:
    """What identifies a dataset in a cache key: its `fingerprint` attribute when it has one, a
    content hash for a `TensorDataset`, else its class name and length."""
    fingerprint = getattr(dataset, "fingerprint", None)
    if fingerprint is not None:
        return fingerprint() if callable(fingerprint) else fingerprint
    if isinstance(dataset, TensorDataset):
        digest = hashlib.sha256()
        for tensor in dataset.tensors:
            digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return {"class": "TensorDataset", "sha256": digest.hexdigest()[:16]}
    return {"class": type(dataset).__name__, "len": len(dataset)}


# ----------------------------------------------------------------------------------------------


def _train_epoch(model, network, train_set, optimizer, scaler, loss_terms, step_callbacks, config, device, generators,
                 epoch, amp_dtype, group) -> dict[str, float]:
    """One epoch; `network` runs the forward pass (`model` or its DDP wrapper), hooks, terms and callbacks
    see `model` itself; `group` None = single process."""
    if group is None:
        sampler, batch_size = RandomSampler(train_set, generator=generators.sampler), config.batch_size
    else:
        # seeded like the single-process RandomSampler (torch.randperm from the same seed): every rank
        # draws the single-process permutation and keeps positions rank, rank + N, ...
        sampler = DistributedSampler(train_set, num_replicas=group.world_size, rank=group.rank, shuffle=True,
                                     seed=generators.sampler_seed)
        batch_size = distributed.per_rank_batch(config.batch_size, group.world_size)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        generator=generators.loader,
        pin_memory=device.type == "cuda",
    )
    layers = list(dict.fromkeys(layer for term in loss_terms for layer in term.layers))
    clone = any(getattr(term, "clone_captured", True) for term in loss_terms if term.layers)
    # per-epoch sums, kept on the device to avoid a sync per step: task loss, each term, correct, count
    totals = torch.zeros(len(loss_terms) + 3, dtype=torch.float64, device=device)
    model.train()
    bar = runtime.progress(loader, desc=f"epoch {epoch + 1}/{config.epochs}", total=len(loader))
    with capture_activations(model, layers, detach=False, clone=clone) as activations:
        for index, (images, labels, *rest) in enumerate(bar):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            extras = {name: value.to(device, non_blocking=True) for name, value in (rest[0] if rest else {}).items()}
            if config.augment == "flip_crop":
                images, extras = _augmented(images, extras, generators.augment, config.crop_padding)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=config.amp):
                logits = network(images)
                task_loss = _task_loss(logits, labels, config.label_smoothing)
            acts = {name: a.float() for name, a in activations.items()} if config.amp else activations
            targets = {"labels": labels, **extras}
            term_values = [_term_value(term, model, acts, targets) for term in loss_terms]
            loss = task_loss + sum(term_values) if term_values else task_loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if step_callbacks:
                with torch.no_grad():
                    for callback in step_callbacks:
                        callback(model, step=epoch * len(loader) + index + 1, epoch=epoch + 1)
            n = labels.numel()
            correct = (logits.detach().argmax(1) == labels).sum()
            totals += torch.stack([
                *(v.detach().double() * n for v in [task_loss, *term_values]),
                correct.double(),
                torch.tensor(float(n), dtype=torch.float64, device=device),
            ])
    if group is not None:
        dist.all_reduce(totals)  # sums and counts over ranks: the metrics of the whole epoch
    sums = totals.tolist()
    count = sums[-1]
    if not all(math.isfinite(s) for s in sums):
        raise FloatingPointError(
            f"non-finite training loss in epoch {epoch + 1}; lower TrainConfig.lr, check the loss terms' weights, "
            f"or check the training images for NaN/inf values."
        )
    row = {"train_loss": sums[0] / count}
    row.update({f"loss_{term.name}": value / count for term, value in zip(loss_terms, sums[1:-2])})
    row["train_acc"] = sums[-2] / count
    return row


def _task_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy; a class id outside the model's outputs is named instead of torch's bare IndexError."""
    try:
        return nn.functional.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    except IndexError as error:
        bad = labels[(labels < 0) | (labels >= logits.shape[1])].unique().tolist()
        raise ValueError(
            f"class id(s) {bad} out of range for a model with {logits.shape[1]} outputs; the dataset's labels "
            f"must lie in 0..{logits.shape[1] - 1}: build the model with the dataset's number of classes."
        ) from error


def _augmented(images: torch.Tensor, extras: dict[str, torch.Tensor], generator: torch.Generator,
               padding: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`flip_crop` of the images and, by the same draws, of every extra target with their N × k × H × W
    shape (e.g. evidence masks); other extras are left as they are."""
    spatial = [name for name, value in extras.items() if value.ndim == 4 and value.shape[-2:] == images.shape[-2:]]
    if not spatial:
        return flip_crop(images, generator, padding=padding), extras
    stacked = torch.cat([images, *(extras[name].to(images.dtype) for name in spatial)], dim=1)
    moved = flip_crop(stacked, generator, padding=padding)
    sizes = [images.shape[1], *(extras[name].shape[1] for name in spatial)]
    images, *parts = moved.split(sizes, dim=1)
    return images, {**extras, **{name: part.to(extras[name].dtype) for name, part in zip(spatial, parts)}}


def _term_value(term: LossTerm, model: nn.Module, activations: Mapping[str, torch.Tensor],
                targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    value = term(model, activations, targets=targets) if getattr(term, "reads_targets", False) else term(model, activations)
    if not torch.is_tensor(value) or value.ndim != 0:
        raise ValueError(f"loss term {term.name!r} must return a scalar tensor, got {type(value).__name__} {getattr(value, 'shape', '')}.")
    return value


def _identity(component: LossTerm | StepCallback) -> dict[str, Any]:
    """A loss term's or step callback's settings (all its fields when it is a dataclass, else its name)."""
    fields = cache.canonical(component) if dataclasses.is_dataclass(component) else {"name": component.name}
    return {"type": type(component).__name__, **fields}


def _callback_identity(step_callbacks: Sequence[StepCallback]) -> dict[str, Any]:
    """The step callbacks' part of a checkpoint or cache identity; nothing without callbacks, so the
    identities of runs without any stay what they were before callbacks existed."""
    return {"step_callbacks": [_identity(c) for c in step_callbacks]} if step_callbacks else {}


def _check_terms(loss_terms: Sequence[LossTerm]) -> None:
    names = [getattr(t, "name", None) for t in loss_terms]
    for term, name in zip(loss_terms, names):
        if not isinstance(term, LossTerm):
            raise TypeError(f"loss term {term!r} lacks `name`, `layers` or `__call__`; see replication.training.loop.LossTerm.")
    if len(set(names)) != len(names):
        raise ValueError(f"loss term names must be unique (they name history columns), got {names}.")


def _check_callbacks(step_callbacks: Sequence[StepCallback]) -> None:
    for callback in step_callbacks:
        if not isinstance(callback, StepCallback):
            raise TypeError(f"step callback {callback!r} lacks `name` or `__call__`; see replication.training.loop.StepCallback.")


def _optimizer(model: nn.Module, config: TrainConfig, loss_terms: Sequence[LossTerm]) -> torch.optim.Optimizer:
    """SGD or Adam; parameters any loss term declares decay-free get weight_decay=0."""
    free_ids = {
        id(p)
        for term in loss_terms
        if hasattr(term, "decay_free_parameters")
        for p in term.decay_free_parameters(model)
    }
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in free_ids], "weight_decay": config.weight_decay},
        {"params": [p for p in params if id(p) in free_ids], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(groups, lr=config.lr)


def _schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    return None


@dataclass(frozen=True)
class EpochGenerators:
    """An epoch's torch generators: `sampler` draws the shuffle order (from `sampler_seed`), `loader`
    the DataLoader's base seed (for worker seeding), `augment` the data augmentation. Separate
    streams, so none can shift another's draws."""

    sampler: torch.Generator
    loader: torch.Generator
    augment: torch.Generator
    sampler_seed: int


def _seed_epoch(seed: int, epoch: int, rank: int = 0) -> EpochGenerators:
    """Seed every global RNG from (seed, epoch) and return the epoch's own generators.

    Under data parallelism every rank shares the shuffle seed (one permutation for all); ranks above 0
    draw their other seeds from (seed, epoch, rank), so their dropout and augmentation differ from
    rank 0's, whose seeds are the single-process ones.
    """
    global_seed, sampler_seed, loader_seed, augment_seed = _seeds([seed, epoch], 4)
    if rank:
        global_seed, loader_seed, augment_seed = _seeds([seed, epoch, rank], 3)
    runtime.seed_everything(global_seed)
    sampler, loader, augment = (torch.Generator().manual_seed(s) for s in (sampler_seed, loader_seed, augment_seed))
    return EpochGenerators(sampler=sampler, loader=loader, augment=augment, sampler_seed=sampler_seed)


def _seeds(entropy: list[int], count: int) -> list[int]:
    return [int(s % 2**63) for s in np.random.SeedSequence(entropy).generate_state(count, dtype=np.uint64)]


def flip_crop(images: torch.Tensor, generator: torch.Generator, *, padding: int) -> torch.Tensor:
    """Each image (N, C, H, W) flipped left-right with probability 1/2, then cropped at a random
    offset from its zero-padded copy (`padding` pixels each side) back to H x W. Draws from
    `generator` (on the CPU, whatever the images' device): 1 + 2 numbers per image."""
    n, channels, height, width = images.shape
    flips = torch.rand(n, generator=generator) < 0.5
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    rows = offsets[:, :1] + torch.arange(height)
    cols = offsets[:, 1:] + torch.arange(width)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    padded = nn.functional.pad(images, (padding,) * 4)
    device = images.device
    return padded[torch.arange(n, device=device)[:, None, None, None], torch.arange(channels, device=device)[None, :, None, None],
                  rows.to(device)[:, None, :, None], cols.to(device)[:, None, None, :]]


def _restore(checkpoint: Path, identity: dict, model, optimizer, schedule, scaler) -> list[dict[str, Any]]:
    state = io.load_torch(checkpoint)
    if state.get("identity") != identity:
        raise ValueError(
            f"checkpoint {checkpoint} was written by a different run ({state.get('identity')} vs {identity}); "
            f"delete it or choose another checkpoint_dir."
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if schedule is not None:
        schedule.load_state_dict(state["schedule"])
    scaler.load_state_dict(state["scaler"])
    return list(state["history"])


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the duration of training (CPU: torch's switch; CUDA: cuDNN flags).

    torch's deterministic mode also fills every new uninitialised tensor with NaN (a debugging aid that
    changes no result of correct code but costs an extra memory pass per allocation); it is switched off.
    """
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    try:
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.utils.deterministic.fill_uninitialized_memory = False
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]
        torch.utils.deterministic.fill_uninitialized_memory = previous[4]

"""Features of several layers from one forward pass, and their dissection, within a memory budget.

Papers read many layers of one network: concepts across depth (00), CGL's dissected layers (03), NAD's
gate locations (05). Running the network once per layer repeats the early layers' work, and keeping
every layer's features at once can exhaust memory; here each batch runs once for a whole group of
layers, the forward pass ends after the last of them (`models.hooks.forward_until`), and layers are
grouped so that one group's features (N × C × h × w float32, held on the CPU) fit `max_bytes`.
A layer that alone exceeds the budget is dissected by `dissect`, which streams it instead.

Features are the tensors a single-layer capture gives, bit for bit, and the dissections equal
per-layer `dissect` calls with the same settings: grouping changes how often the network runs, never
a number.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from replication.analysis.dissection import (Dissection, DissectionConfig, DissectionOptions, dissect, dissect_features,
                                             quantile_level, scored_categories)
from replication.data.broden import broden_loader
from replication.models.hooks import forward_until
from replication.models.surgery import eval_mode
from replication.runtime import progress, resolve_device

DEFAULT_MAX_BYTES = 1 << 30  # features held at once (1 GiB of float32)
_FLOAT32_BYTES = 4


def _layer_list(layers: Sequence[str]) -> list[str]:
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("no layers given; pass the module names whose features you want.")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"layers {repeated} are listed more than once; list each layer once.")
    return names


def _check_data(dataset, batch_size: int = 1) -> None:
    if len(dataset) == 0:
        raise ValueError("the dataset is empty; choose a split or categories that keep some images.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")


@torch.no_grad()
def feature_shapes(model: nn.Module, layers: Sequence[str], dataset, *,
                   device: str | torch.device | None = None) -> dict[str, tuple[int, ...]]:
    """Per-image output shape (C × h × w for a conv layer) of each of `layers`, from the first image.

    One forward pass on one image, in eval mode (the model's modes are restored), ended after the
    last requested layer. The model is moved to `device`.
    """
    names = _layer_list(layers)
    _check_data(dataset)
    device = resolve_device(device)
    image = dataset[0]["image"].unsqueeze(0).to(device)
    with eval_mode(model.to(device)), forward_until(model, names) as forward:
        outputs = forward(image)
    return {name: tuple(outputs[name].shape[1:]) for name in names}


def layer_groups(layer_bytes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of layers (in the given order) whose byte counts sum to at most `max_bytes`.

    A layer larger than `max_bytes` on its own forms a group of one.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive (the bytes of features held at once); got {max_bytes}.")
    groups: list[list[str]] = []
    used = 0
    for name, size in layer_bytes.items():
        if not groups or used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _shapes_and_bytes(model: nn.Module, names: list[str], dataset, device: torch.device
                      ) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """`feature_shapes` and the bytes each layer's features take for the whole dataset (float32)."""
    shapes = feature_shapes(model, names, dataset, device=device)
    return shapes, {name: len(dataset) * math.prod(shape) * _FLOAT32_BYTES for name, shape in shapes.items()}


@torch.no_grad()
def _gather(model: nn.Module, layers: list[str], dataset, *, batch_size: int, device: torch.device,
            num_workers: int) -> dict[str, torch.Tensor]:
    """The outputs of `layers` for every image (float32, CPU), one truncated forward pass per batch."""
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    loader = broden_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    with eval_mode(model.to(device)), forward_until(model, layers) as forward:
        for batch in progress(loader, desc=f"features of {len(layers)} layer(s)"):
            for name, output in forward(batch["image"].to(device, non_blocking=True)).items():
                chunks[name].append(output.float().cpu())
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def layer_features(model: nn.Module, layers: Sequence[str], dataset, *, batch_size: int,
                   device: str | torch.device | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                   num_workers: int = 0) -> dict[str, torch.Tensor]:
    """The outputs of `layers` (N × C × h × w float32 on the CPU, in dataset order) from one pass.

    Each batch runs once, in eval mode (the model's modes are restored), up to the last requested
    layer. Fails before the pass when the features together would exceed `max_bytes`: request fewer
    layers per call, or let `dissect_layers` group them.
    """
    names = _layer_list(layers)
    _check_data(dataset, batch_size)
    device = resolve_device(device)
    _, sizes = _shapes_and_bytes(model, names, dataset, device)
    if sum(sizes.values()) > max_bytes:
        raise ValueError(
            f"the features of {names} need {sum(sizes.values()):,} bytes, more than max_bytes={max_bytes:,}; "
            "request fewer layers per call or raise max_bytes."
        )
    return _gather(model, names, dataset, batch_size=batch_size, device=device, num_workers=num_workers)


def dissect_layers(
    model: nn.Module,
    layers: Sequence[str],
    dataset,
    *,
    config: DissectionConfig,
    categories: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    **options,
) -> dict[str, Dissection]:
    """Network Dissection of each of `layers`, keyed and ordered as `layers`, equal to per-layer `dissect`
    with `config`'s quantile, IoU threshold and batch size (a profile's [dissection] section).

    Layers are taken in groups whose features fit `max_bytes` (`layer_groups`), one forward pass over
    `dataset` per group; a layer too large for the budget alone is streamed by `dissect`. `options`:
    the fields of `analysis.dissection.DissectionOptions`, as for `dissect`.
    """
    names = _layer_list(layers)
    _check_data(dataset, config.batch_size)
    chosen = DissectionOptions.from_keywords(options)  # bad settings fail before any forward pass
    quantile_level(config.quantile, chosen.quantile_rule)
    scored_categories(dataset, categories)
    device = resolve_device(device)
    settings = dict(categories=categories, device=device, **config.dissect_keywords(), **options)
    shapes, sizes = _shapes_and_bytes(model, names, dataset, device)
    not_maps = {name: shape for name, shape in shapes.items() if len(shape) != 3}
    if not_maps:
        raise ValueError(f"layers {list(not_maps)} give outputs of per-image shape {list(not_maps.values())}; "
                         "dissection needs channels × height × width maps (convolutional layers).")
    results: dict[str, Dissection] = {}
    for group in layer_groups(sizes, max_bytes):
        if sizes[group[0]] > max_bytes:
            results[group[0]] = dissect(model, group[0], dataset, **settings)
            continue
        features = _gather(model, group, dataset, batch_size=config.batch_size, device=device,
                           num_workers=chosen.num_workers)
        for name in group:
            results[name] = dissect_features(features.pop(name), dataset, layer=name, **settings)
    return {name: results[name] for name in names}

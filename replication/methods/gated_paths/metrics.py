"""What the hard-gated paths do: path accuracy (claim N1) and the hit rate of path activation maps on
2x2 mosaics (spec section 6.1, as `cam_2x2.py`), its per-layer and per-class summaries, the largest
dip (N5) and the distance between two hit-rate curves (N6)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from replication.methods.gated_paths.gates import GateHooks, gated
from replication.methods.gated_paths.images import Mosaic, image_and_label, mosaic_tensor
from replication.methods.gated_paths.search import PathSet
from replication.runtime import resolve_device

def _gated_forward(model: nn.Module, hooks: GateHooks, x: torch.Tensor, gates: Sequence[torch.Tensor] | None,
                   rows: torch.Tensor | None) -> torch.Tensor:
    hooks.set(gates, rows)
    return model(x)


@torch.no_grad()
def path_accuracy(model: nn.Module, paths: PathSet, class_images: Mapping[int, torch.Tensor], *,
                  batch_size: int = 128, device: str | torch.device | None = None) -> pd.DataFrame:
    """Claim N1: per class c, what its hard-gated path does next to the original net.

    Every path runs on every class's images (per-sample gate rows). Own-class images give the
    original's and the path's accuracy and `agreement` (the path predicts what the original
    predicts); the other classes' images give the specificity control: the share the path labels c
    (`path_false_positive`) against the share the original labels c (`original_false_positive`). A
    path that merely biases the net toward c keeps its own-class accuracy but raises the former.
    Also returns the original net's predictions on the own-class images (column `predicted`, a
    list) for the misclassification analysis.
    """
    device = resolve_device(device)
    gates = [g.to(device) for g in paths.hard_gates()]
    images = torch.cat([class_images[c] for c in paths.classes])
    labels = torch.cat([torch.full((len(class_images[c]),), c, dtype=torch.long) for c in paths.classes])

    def predict(row: int | None) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            rows = None if row is None else torch.full((len(x),), row, dtype=torch.long, device=device)
            out.append(_gated_forward(model, hooks, x, None if row is None else gates, rows).argmax(1).cpu())
        return torch.cat(out)

    kept = paths.units_kept().groupby("class_id")[["kept", "channels"]].sum()
    out = []
    with gated(model, paths.locations) as hooks:
        original = predict(None)
        for k, class_id in enumerate(paths.classes):
            path = predict(k)
            own, others = labels == class_id, labels != class_id
            out.append({"class_id": int(class_id), "n_images": int(own.sum()),
                        "original_accuracy": float((original[own] == class_id).float().mean()),
                        "path_accuracy": float((path[own] == class_id).float().mean()),
                        "agreement": float((path[own] == original[own]).float().mean()),
                        "original_false_positive": float((original[others] == class_id).float().mean()),
                        "path_false_positive": float((path[others] == class_id).float().mean()),
                        "units_kept": float(kept.loc[class_id, "kept"] / kept.loc[class_id, "channels"]),
                        "predicted": original[own].tolist()})
    return pd.DataFrame(out)


def top_fraction_mask(maps: torch.Tensor, size: int, *, top_fraction: float = 0.1,
                      quantize_uint8: bool = True) -> torch.Tensor:
    """Binary top-`top_fraction` masks (N, size, size) of activation maps (N, h, w), as `cam_2x2.py`.

    Min-max normalise, cast to uint8 (truncating), resize with PIL's bicubic filter to `size` (uint8
    out, as the official code), threshold at the k-th largest value with a strict `>` (official: uint8
    ties can make the mask much smaller than k). `quantize_uint8=False`: float maps resized with
    torch's bicubic and exactly the top k [I].
    """
    k = int(math.floor(top_fraction * size * size))
    if k < 1:
        raise ValueError(f"top_fraction={top_fraction} selects no pixel of a {size}x{size} map")
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    norm = torch.where(span > 0, (maps - lo) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))
    if quantize_uint8:
        flat = _pil_bicubic(torch.floor(norm * 255).to(torch.uint8), size).flatten(1).float()
        return (flat > flat.topk(k, dim=1).values[:, -1:]).view(-1, size, size)
    resized = norm[:, None] if norm.shape[-2:] == (size, size) else \
        F.interpolate(norm[:, None], size=(size, size), mode="bicubic", align_corners=False)
    flat = resized.flatten(1)
    return torch.zeros_like(flat, dtype=torch.bool).scatter(1, flat.topk(k, dim=1).indices, True).view(-1, size, size)


def _pil_bicubic(maps: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 maps (N, h, w) resized to (N, size, size) by PIL's bicubic filter, the official resize
    (torch's bicubic uses another kernel, a = -0.75 against PIL's -0.5, and moves single maps' shares)."""
    if maps.shape[-2:] == (size, size):
        return maps
    arrays = maps.cpu().numpy()
    return torch.from_numpy(np.stack([np.asarray(Image.fromarray(a, mode="L").resize((size, size), Image.BICUBIC))
                                      for a in arrays]))


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
    tiles = torch.stack([mosaic_tensor([image_and_label(dataset[i])[0] for i in m.indices], mosaic_size)
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


def class_hit_rates(hits: pd.DataFrame) -> pd.DataFrame:
    """Per class (rows, by class id) and layer (columns): the mean hit rate over the quadrants that show
    the class (empty maps skipped), the unit of replication of the hit-rate claims N4-N6."""
    return hits.groupby(["class_id", "layer"], sort=True)["hit"].mean().unstack("layer")


def deep_hit_rates(hits: pd.DataFrame, last: int = 3) -> pd.Series:
    """Per class: the mean of its hit rates at the last `last` gate locations (the number `cam_2x2.py` prints)."""
    table = class_hit_rates(hits)
    return table[table.columns[-last:]].mean(axis=1)


def largest_dip(class_hits: pd.DataFrame) -> dict[str, Any]:
    """Claim N5: the pair of layers (shallow, deep) whose mean hit rate falls most with depth.

    `class_hits` is `class_hit_rates`; returns the layers, the per-class drops hit(shallow) - hit(deep)
    (classes with an empty map at either layer left out) and how many pairs were searched (for the
    correction of the chosen pair's test). Without any fall, the pair that rises least.
    """
    layers = list(class_hits.columns)
    if len(layers) < 2:
        raise ValueError(f"a dip needs at least two gate locations, got {len(layers)}")
    pairs = [(a, b) for i, a in enumerate(layers) for b in layers[i + 1:]]
    drops = {pair: (class_hits[pair[0]] - class_hits[pair[1]]).dropna() for pair in pairs}
    shallow, deep = max(pairs, key=lambda pair: drops[pair].mean() if len(drops[pair]) else -math.inf)
    return {"from_layer": shallow, "to_layer": deep, "drops": drops[(shallow, deep)].to_numpy(), "searched": len(pairs)}


def curve_distance(a: Sequence[float], b: Sequence[float], *, grid: int = 21) -> float:
    """Claim N6: mean absolute difference of two per-layer hit-rate curves on normalised depth [0, 1]
    (layer l of L at depth l / (L - 1), linear interpolation), so networks of different depths compare."""
    depth = np.linspace(0, 1, grid)
    ya = np.interp(depth, np.linspace(0, 1, len(a)), np.asarray(a, dtype=float))
    yb = np.interp(depth, np.linspace(0, 1, len(b)), np.asarray(b, dtype=float))
    return float(np.mean(np.abs(ya - yb)))

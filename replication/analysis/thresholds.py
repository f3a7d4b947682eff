"""Per-unit thresholds of Network Dissection and the maps they are compared with: the quantile level
(exact or Lite's read-out), the exact top-values and the bounded-memory sketch that find it, the
comparison of activations with a threshold (`>` or `>=`, ties handled exactly) and the resizing of
feature maps to mask resolution (antialiased when shrinking, as PIL in Lite)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

QUANTILE_RULES = ("exact", "lite")
QUANTILE_METHODS = ("auto", "exact", "sketch")
UPSAMPLE_MODES = {
    "bilinear": {"mode": "bilinear", "align_corners": False},
    "bilinear-corners": {"mode": "bilinear", "align_corners": True},
    "nearest": {"mode": "nearest"},
}
COMPARISONS = (">=", ">")


# ---------------------------------------------------------------- quantiles
def quantile_level(quantile: float, rule: str = "exact") -> float:
    """The quantile level at which thresholds are read: 1 − quantile ("exact"), or Lite's read-out.

    NetDissect-Lite reads element int(1000·(1 − quantile) − 1) of 1000 evenly spaced quantiles,
    i.e. level 994/999 ≈ 0.99499 for quantile 0.005 (spec 2.2).
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1) (the top fraction of activations, e.g. 0.005); got {quantile}.")
    if rule == "exact":
        return 1.0 - quantile
    if rule == "lite":
        return int(1000 * (1 - quantile) - 1) / 999
    raise ValueError(f"unknown quantile_rule {rule!r}; use one of {QUANTILE_RULES}.")


def _order_statistics(n: int, level: float) -> tuple[int, int, float]:
    """Ascending ranks (lower, upper) and weight read by numpy's 'linear' quantile at `level`."""
    virtual = (n - 1) * level
    lower = min(math.floor(virtual), n - 1)
    return lower, min(lower + 1, n - 1), virtual - lower


def _lerp(lower: torch.Tensor, upper: torch.Tensor, gamma: float) -> torch.Tensor:
    """numpy's quantile interpolation, bit for bit (it switches form at gamma = 0.5)."""
    diff = upper - lower
    return upper - diff * (1 - gamma) if gamma >= 0.5 else lower + diff * gamma


class TopValues:
    """Exact streaming quantile: the m largest values of each unit, m = all the quantile reads."""

    method = "exact"

    def __init__(self, units: int, n: int, level: float, device: torch.device):
        self.n, self.level = n, level
        self.m = n - _order_statistics(n, level)[0]
        self.values = torch.empty(units, 0, device=device)
        self.rank_error = 0

    @staticmethod
    def bytes_needed(units: int, n: int, level: float) -> int:
        return units * (n - _order_statistics(n, level)[0]) * 4

    def update(self, values: torch.Tensor) -> None:
        merged = torch.cat([self.values, values], dim=1)
        self.values = merged.topk(self.m, dim=1, sorted=False).values if merged.shape[1] > self.m else merged

    def thresholds(self) -> torch.Tensor:
        lower, upper, gamma = _order_statistics(self.n, self.level)
        top = self.values.sort(dim=1, descending=True).values.double()
        return _lerp(top[:, self.n - 1 - lower], top[:, self.n - 1 - upper], gamma)


class CompactorSketch:
    """Deterministic mergeable quantile sketch with a tracked rank-error bound (bounded memory)."""

    method = "sketch"

    def __init__(self, units: int, n: int, level: float, capacity: int):
        self.n, self.level = n, level
        self.capacity = max(2, capacity - capacity % 2)
        self.levels: list[torch.Tensor | None] = []
        self.parity: list[int] = []
        self.pending: list[torch.Tensor] = []
        self.rank_error = 0  # no value's rank moves by more than this (in positions)

    def update(self, values: torch.Tensor) -> None:
        self.pending.append(values)
        merged = torch.cat(self.pending, dim=1)
        full = merged.shape[1] // self.capacity * self.capacity
        for chunk in merged[:, :full].split(self.capacity, dim=1):
            self._push(chunk.sort(dim=1).values, 0)
        self.pending = [merged[:, full:]]

    def _push(self, buffer: torch.Tensor, level: int) -> None:
        while True:
            if level == len(self.levels):
                self.levels.append(None)
                self.parity.append(0)
            if self.levels[level] is None:
                self.levels[level] = buffer
                return
            merged = torch.cat([self.levels[level], buffer], dim=1).sort(dim=1).values
            buffer = merged[:, self.parity[level] :: 2]  # keep alternate elements, offset alternating
            self.parity[level] ^= 1
            self.levels[level] = None
            self.rank_error += 2**level
            level += 1

    def thresholds(self) -> torch.Tensor:
        parts = [(buf, 2**i) for i, buf in enumerate(self.levels) if buf is not None] + [(self.pending[0], 1)]
        values = torch.cat([buf for buf, _ in parts], dim=1)
        weights = torch.cat([torch.full((buf.shape[1],), w, dtype=torch.int64, device=values.device) for buf, w in parts])
        order = values.argsort(dim=1)
        cumulative = weights[order].cumsum(dim=1)  # weighted ranks: total = n exactly
        lower, upper, gamma = _order_statistics(self.n, self.level)
        sorted_values = values.gather(1, order).double()

        def at_rank(rank: int) -> torch.Tensor:
            target = torch.full((values.shape[0], 1), rank + 1, dtype=torch.int64, device=values.device)
            return sorted_values.gather(1, torch.searchsorted(cumulative, target)).squeeze(1)

        return _lerp(at_rank(lower), at_rank(upper), gamma)


def comparison_thresholds(thresholds: torch.Tensor, comparison: str) -> torch.Tensor:
    """float32 thresholds t with (x op t) ⟺ (x op T) for every float32 x, T being float64."""
    rounded = thresholds.float()
    if comparison == ">=":
        too_low = rounded.double() < thresholds
        return torch.where(too_low, torch.nextafter(rounded, torch.full_like(rounded, math.inf)), rounded)
    too_high = rounded.double() > thresholds
    return torch.where(too_high, torch.nextafter(rounded, torch.full_like(rounded, -math.inf)), rounded)


def compare_to_thresholds(values: torch.Tensor, thresholds: torch.Tensor, comparison: str) -> torch.Tensor:
    return values >= thresholds if comparison == ">=" else values > thresholds


def resize_maps(maps: torch.Tensor, size: Sequence[int], upsample: str = "bilinear",
                antialias: bool = True) -> torch.Tensor:
    """Float maps (... × h × w, 4-d) at the mask `size` (sh, sw), as the tally thresholds them.

    Upsampling (h ≤ sh and w ≤ sw) interpolates between the nearest map pixels (`UPSAMPLE_MODES`).
    When the map is larger than the mask along a dimension and `antialias` is on, the bilinear modes
    use torch's antialiased resize: Pillow's convolution resize, whose triangle filter widens with
    the scale so every map pixel is averaged in, as Lite's `imresize(map, (sh, sw), mode='F')` does;
    without it each output samples ≤ 2×2 map pixels. "nearest" always samples. Same size: unchanged.
    """
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    interpolation = UPSAMPLE_MODES[upsample]
    shrinks = maps.shape[-2] > size[0] or maps.shape[-1] > size[1]
    average = antialias and shrinks and interpolation["mode"] == "bilinear"
    return F.interpolate(maps, size=size, antialias=average, **interpolation)

"""What every basis of paper 04 reduces to: pixel vectors, their standardisation, and linear detectors.

A layer's features N × D × h × w give N·h·w pixel vectors x_p ∈ R^D (`pixel_matrix`). UIBE learns in
the standardised space x̃ = (x − μ) / σ (`Standardizer`, per-dimension z-score on the training pixels,
spec 04 section 3.2 [I]); IBD's probes read x itself. Both end as `LinearDetectors`: rows w_k and
thresholds t_k with "direction k fires at p" ⟺ w_k · x_p > t_k in the **original** feature space, which
is what the shared dissection takes (`basis=weight, thresholds=threshold`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def derived_seed(seed: int, key: int) -> int:
    """A seed for one part of a seeded computation (a restart, a concept's probe): distinct per (seed, key)."""
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0])


def pixel_matrix(features: torch.Tensor) -> torch.Tensor:
    """N × D × h × w feature maps as (N·h·w) × D pixel vectors (image-major, then row, then column)."""
    if features.ndim != 4:
        raise ValueError(f"features must be N × D × h × w maps; got shape {tuple(features.shape)}. "
                         "Pass a layer's features from analysis.features.layer_features.")
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def shuffled_pixels(pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """`pixels` (P × D) with every dimension permuted across pixels independently (seeded): each
    dimension keeps its values, the pixels lose their joint structure. The null for claim U1: what the
    objective alone makes one-hot on features without concepts."""
    generator = torch.Generator().manual_seed(seed)
    columns = [column[torch.randperm(len(column), generator=generator)] for column in pixels.T]
    return torch.stack(columns, dim=1)


@dataclass(frozen=True)
class Standardizer:
    """Per-dimension z-score x̃ = (x − mean) / std; dimensions with std 0 keep std 1 (they stay 0)."""

    mean: torch.Tensor  # D, float32
    std: torch.Tensor  # D, float32

    @classmethod
    def fit(cls, pixels: torch.Tensor, *, batch_size: int = 65536) -> "Standardizer":
        """Mean and population std of `pixels` (P × D), accumulated in float64 over row chunks."""
        if pixels.ndim != 2 or len(pixels) < 2:
            raise ValueError(f"pixels must be a P × D matrix with P >= 2; got shape {tuple(pixels.shape)}.")
        total = torch.zeros(pixels.shape[1], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for chunk in pixels.split(batch_size):
            chunk = chunk.to(torch.float64).cpu()
            total += chunk.sum(0)
            squares += (chunk * chunk).sum(0)
        mean = total / len(pixels)
        std = (squares / len(pixels) - mean * mean).clamp(min=0).sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))
        return cls(mean.float(), std.float())

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)


@dataclass(frozen=True)
class LinearDetectors:
    """K linear detectors in the original feature space: direction k fires where weight[k] · x > threshold[k].

    `names` says what each row is (a direction number, or the concept an IBD probe was trained on).
    Pass `weight` and `threshold` to `analysis.dissection.dissect_features` as `basis=` and `thresholds=`.
    """

    weight: torch.Tensor  # K × D, float64
    threshold: torch.Tensor  # K, float64
    names: tuple[str, ...]

    def __post_init__(self):
        if self.weight.ndim != 2 or self.threshold.shape != (self.weight.shape[0],) or len(self.names) != len(self.threshold):
            raise ValueError(f"LinearDetectors needs a K × D weight, K thresholds and K names; got "
                             f"{tuple(self.weight.shape)}, {tuple(self.threshold.shape)} and {len(self.names)}.")

    def scores(self, pixels: torch.Tensor) -> torch.Tensor:
        """w_k · x_p − t_k for P × D pixels (P × K; positive where the detector fires)."""
        weight = self.weight.to(device=pixels.device, dtype=pixels.dtype)
        return pixels @ weight.T - self.threshold.to(device=pixels.device, dtype=pixels.dtype)

    def dissect_keywords(self) -> dict[str, torch.Tensor]:
        """`basis` and `thresholds` for the shared dissection."""
        return {"basis": self.weight, "thresholds": self.threshold}

"""LAP's knowledge-injection losses (spec 02 section 3.4, all [I]) as training-loop loss terms.

Each reads the scores S of a LAP layer's attention block (`layer`, captured with their graph) and the
batch's targets, and returns its weighted value. With class-specific heads (heads = classes, the reading
of the weak scheme for a multi-class task [I]) the head of the image's class is its "positive" map and
every other head a "negative" one:

- `WeakEvidenceLoss` (image-level evidence, no annotation): L_pos = mean over images of (1 - max_p A_y),
  L_neg = mean over images and the other classes k of max_p A_k; `top_k` None: the maximum (the spec's),
  k: the mean of the k largest positions (a multiple-instance variant);
- `MaskInjectionLoss` (expert annotation, where masks exist: ConceptWorld's evidence masks), per image
  L_in = -mean_{p in mask} log A_p, L_out = -mean_{p outside} log(1 - A_p) on the class head, then the mean
  over images (L_in over the images with evidence); the mask averaged to the attention grid (a soft
  share in [0, 1]: each position weighs by how much it is in); log A = logsigmoid(S), exact at saturation;
- `AttentionSparsity`: mean A (λ_s).
One head (heads = 1): the map of every image is its positive map and L_neg has no term, so the weak loss
is vacuous there (a constant high map satisfies it): it needs class heads, or the spec's binary negatives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-6


def _class_head(attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """B × h × w: the head of each image's class (the only head when there is one)."""
    if attention.shape[1] == 1:
        return attention[:, 0]
    return attention[torch.arange(len(labels), device=labels.device), labels]


def _peak(attention: torch.Tensor, top_k: int | None) -> torch.Tensor:
    flat = attention.flatten(-2)
    return flat.amax(-1) if top_k is None else flat.topk(min(top_k, flat.shape[-1]), dim=-1).values.mean(-1)


@dataclass(frozen=True)
class _AttentionTerm:
    """A weighted loss term on the scores of one LAP attention block (`layer`, captured by the loop)."""

    layer: str
    weight: float = 1.0

    @property
    def layers(self) -> tuple[str, ...]:
        return (self.layer,)

    def attention(self, activations: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(activations[self.layer].float())


@dataclass(frozen=True)
class WeakEvidenceLoss(_AttentionTerm):
    """weight · (L_pos + L_neg) on the attention of the LAP layer whose attention block is `layer`."""

    top_k: int | None = None  # None: the maximum (spec); k: the mean of the k largest positions
    name: str = "lap_weak"
    reads_targets = True

    def __call__(self, model: nn.Module, activations: Mapping[str, torch.Tensor], *,
                 targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        labels = targets["labels"]
        peaks = _peak(self.attention(activations), self.top_k)  # B × heads
        positive = (1 - peaks.gather(1, labels[:, None]) if peaks.shape[1] > 1 else 1 - peaks).mean()
        if peaks.shape[1] == 1:
            return self.weight * positive
        others = torch.ones_like(peaks, dtype=torch.bool).scatter_(1, labels[:, None], False)
        negative = (peaks * others).sum(1).div(others.sum(1)).mean()
        return self.weight * (positive + negative)


@dataclass(frozen=True)
class MaskInjectionLoss(_AttentionTerm):
    """weight · (L_in + L_out) against `targets["masks"]` (B × 1 × H × W in [0, 1], any size), per image
    then averaged (an image with a large mask weighs as much as one with a small mask)."""

    name: str = "lap_mask"
    reads_targets = True

    def __call__(self, model: nn.Module, activations: Mapping[str, torch.Tensor], *,
                 targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        scores = _class_head(activations[self.layer].float(), targets["labels"]).flatten(1)
        share = F.adaptive_avg_pool2d(targets["masks"].float(), activations[self.layer].shape[-2:]).flatten(1)
        inside_mass, outside_mass = share.sum(1), (1 - share).sum(1)
        inside = -(share * F.logsigmoid(scores)).sum(1) / inside_mass.clamp_min(EPS)
        outside = -((1 - share) * F.logsigmoid(-scores)).sum(1) / outside_mass.clamp_min(EPS)
        has_evidence, has_background = (inside_mass > 0).float(), (outside_mass > 0).float()
        return self.weight * ((inside * has_evidence).sum() / has_evidence.sum().clamp_min(1)
                              + (outside * has_background).sum() / has_background.sum().clamp_min(1))


@dataclass(frozen=True)
class AttentionSparsity(_AttentionTerm):
    """weight · mean A: fewer positions attended."""

    name: str = "lap_sparsity"

    def __call__(self, model: nn.Module, activations: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.weight * self.attention(activations).mean()

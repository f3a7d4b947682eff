"""IBD's concept basis (Zhou et al., ECCV 2018; `CSAILVision/IBD`, shared spec section 4): the
supervised baseline of paper 04.

One linear probe per concept on a layer's pixel vectors: y = sigmoid(w·x + b), trained with MSE
against 0/1 targets by plain SGD (lr 1e-2, batch 128, 15 epochs, the last kept); positives are all
cells carrying the concept, negatives a seeded pool of up to 20× the positives, of which each epoch
trains on 2× the positives, at random in the first epoch and then the highest-scoring ones under the
probe after the previous epoch (hard-negative mining). Labels: the masks down-sampled to the feature
grid by taking each cell's centre pixel (`nearest-exact`; the official code's nearest-neighbour
resize), whole-image labels covering every cell; object and part concepts by default, as the official
code. Probes start from nn.Linear's default distribution U(−1/√D, 1/√D), drawn from a seeded
generator (the official code seeds nothing).

Deviations from the official code, each one of its traps (shared spec section 4): the probes train on
the train split's features only (the official code uses every image, so its basis has seen the val
images S¹/S² score on); the MSE compares outputs of shape (B,) with targets (B,) (the official (B, 1)
output broadcasts to a B × B loss on current PyTorch); and detection uses the **uncentred** probe
(w, b), fires ⟺ w·x > −b, while the basis is the mean-centred, unit-normalised w (the official centring
keeps the trained bias, so the centred weights with that bias are no valid detector).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from replication.data.broden import broden_loader
from replication.methods.interpretable_basis.detectors import LinearDetectors, derived_seed
from replication.runtime import progress, resolve_device


@dataclass(frozen=True)
class IBDConfig:
    """IBD's settings, the official values by default: the concept `categories`, the negative pool
    (`negative_pool` × positives), negatives per epoch (`epoch_negatives` × positives), hard-negative
    mining on or off, SGD's `epochs`, `lr` and `batch_size`, and the fewest positive cells a concept
    needs (`min_positives`)."""

    categories: tuple[str, ...] = ("object", "part")
    negative_pool: int = 20
    epoch_negatives: int = 2
    hard_negatives: bool = True
    epochs: int = 15
    lr: float = 1e-2
    batch_size: int = 128
    min_positives: int = 1

    def __post_init__(self):
        for name in ("negative_pool", "epoch_negatives", "epochs", "batch_size", "min_positives"):
            if getattr(self, name) < 1:
                raise ValueError(f"IBDConfig.{name} must be >= 1; got {getattr(self, name)}.")
        if self.epoch_negatives > self.negative_pool:
            raise ValueError(f"IBDConfig.epoch_negatives ({self.epoch_negatives}) cannot exceed negative_pool "
                             f"({self.negative_pool}): each epoch draws its negatives from the pool.")


@torch.no_grad()
def cell_labels(dataset, size: tuple[int, int], *, batch_size: int, num_workers: int = 0) -> torch.Tensor:
    """The labels of every feature-grid cell: (N·h·w) × planes label numbers (0 = none), in the order of
    `detectors.pixel_matrix` (image, row, column). Pixel planes are sampled at each cell's centre
    (`nearest-exact`); whole-image labels (scene, texture) fill every cell of their image."""
    h, w = (int(s) for s in size)
    parts = []
    for batch in progress(broden_loader(dataset, batch_size=batch_size, num_workers=num_workers), desc="IBD cell labels"):
        planes = batch["pixel_labels"]
        if planes.shape[1]:
            planes = F.interpolate(planes.double(), size=(h, w), mode="nearest-exact").long()
        count = planes.shape[0]
        image = batch["image_labels"][:, :, None, None].expand(-1, -1, h, w)
        parts.append(torch.cat([planes, image], dim=1).permute(0, 2, 3, 1).reshape(count * h * w, -1))
    width = max(part.shape[1] for part in parts)
    return torch.cat([F.pad(part, (0, width - part.shape[1])) for part in parts])


@dataclass
class IBDBasis:
    """Fitted probes: `weight` (K × D) and `bias` (K) as trained, the concept `labels` (label numbers)
    and `names`, the positive cells each concept had, the config and seed."""

    weight: torch.Tensor
    bias: torch.Tensor
    labels: np.ndarray
    names: tuple[str, ...]
    positives: np.ndarray
    config: IBDConfig
    seed: int

    def detectors(self) -> LinearDetectors:
        """The uncentred probes' own rule sigmoid(w·x + b) > 0.5, i.e. w·x > −b."""
        return LinearDetectors(self.weight.double(), -self.bias.double(), self.names)

    def basis(self) -> torch.Tensor:
        """IBD's concept basis: each w mean-centred over its D entries and scaled to unit length."""
        centred = self.weight.double() - self.weight.double().mean(dim=1, keepdim=True)
        return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def settings(self) -> dict:
        return {**asdict(self.config), "seed": self.seed, "concepts": len(self.labels)}


def ibd_concepts(cells: torch.Tensor, dataset, config: IBDConfig) -> list[int]:
    """Label numbers of the concepts to probe: primary category in `config.categories`, with at least
    `config.min_positives` positive cells."""
    missing = [c for c in config.categories if c not in dataset.categories]
    if missing:
        raise ValueError(f"IBD categories {missing} are not in the dataset (it has {list(dataset.categories)}); "
                         "choose IBDConfig.categories among them.")
    wanted = {dataset.categories.index(c) for c in config.categories}
    primary = np.asarray(dataset.primary_category)
    ordered = cells.sort(dim=1).values
    once = torch.cat([ordered[:, :1], torch.where(ordered[:, 1:] == ordered[:, :-1], 0, ordered[:, 1:])], dim=1)
    counts = torch.bincount(once.flatten(), minlength=len(primary)).numpy()  # cells carrying each label
    return [label for label in range(1, len(primary))
            if primary[label] in wanted and counts[label] >= config.min_positives]


def fit_ibd(pixels: torch.Tensor, cells: torch.Tensor, dataset, config: IBDConfig = IBDConfig(), *,
            seed: int = 0, device: str | torch.device | None = None) -> IBDBasis:
    """Train one probe per concept on train-split pixel vectors (P × D, `detectors.pixel_matrix`) with
    their `cell_labels` (P × planes); `dataset` (the train split: one with another `split` is refused)
    gives label names and categories."""
    if pixels.ndim != 2 or cells.ndim != 2 or len(pixels) != len(cells):
        raise ValueError(f"pixels (P × D) and cells (P × planes) must have one row per cell; got {tuple(pixels.shape)} "
                         f"and {tuple(cells.shape)}. Build cells with cell_labels at the features' grid size.")
    split = getattr(dataset, "split", "train")
    if split != "train":
        raise ValueError(f"IBD trains on the train split only (S¹/S² score on val); got a dataset with split={split!r}. "
                         "Pass the train split's features, cell labels and dataset.")
    device = resolve_device(device)
    concepts = ibd_concepts(cells, dataset, config)
    if not concepts:
        raise ValueError(f"no concept of {list(config.categories)} has {config.min_positives}+ positive cells; "
                         "use more images or other categories.")
    weights, biases, positives = [], [], []
    for label in progress(concepts, desc="IBD probes"):
        positive = (cells == label).any(dim=1)
        generator = torch.Generator().manual_seed(derived_seed(seed, label))
        w, b = _train_probe(pixels, positive, config, generator, device)
        weights.append(w)
        biases.append(b)
        positives.append(int(positive.sum()))
    return IBDBasis(torch.stack(weights), torch.stack(biases), np.asarray(concepts),
                    tuple(dataset.label_names[c] for c in concepts), np.asarray(positives), config, seed)


def _train_probe(pixels, positive, config: IBDConfig, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One concept's probe by SGD on MSE(sigmoid(w·x + b), target), with the negative pool and mining."""
    pos_index = positive.nonzero().squeeze(1)
    neg_index = (~positive).nonzero().squeeze(1)
    n_pos = len(pos_index)
    pool_index = neg_index[torch.randperm(len(neg_index), generator=generator)[: config.negative_pool * n_pos]]
    x_pos, pool = pixels[pos_index].to(device).float(), pixels[pool_index].to(device).float()
    per_epoch = min(config.epoch_negatives * n_pos, len(pool))
    bound = 1 / math.sqrt(pixels.shape[1])
    w = ((torch.rand(pixels.shape[1], generator=generator) * 2 - 1) * bound).to(device).requires_grad_()
    b = ((torch.rand((), generator=generator) * 2 - 1) * bound).to(device).requires_grad_()
    optimizer = torch.optim.SGD([w, b], lr=config.lr)
    chosen = torch.randperm(len(pool), generator=generator)[:per_epoch].to(device)
    for _ in range(config.epochs):
        x = torch.cat([x_pos, pool[chosen]])
        target = torch.cat([torch.ones(n_pos, device=device), torch.zeros(len(chosen), device=device)])
        for batch in torch.randperm(len(x), generator=generator).to(device).split(config.batch_size):
            loss = F.mse_loss(torch.sigmoid(x[batch] @ w + b), target[batch])  # (B,) vs (B,): no broadcast
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            scores = pool @ w + b
        if config.hard_negatives:
            chosen = scores.topk(per_epoch).indices
        else:
            chosen = torch.randperm(len(pool), generator=generator)[:per_epoch].to(device)
    return w.detach().cpu(), b.detach().cpu()

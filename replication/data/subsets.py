"""Subsets and in-memory copies of datasets, for experiments that train or dissect many models on the same images.

`InMemoryDataset` decodes `(image, class_id)` samples once; `InMemoryItems` does the same for Broden
items; `seeded_subset` draws a reproducible subset that still exposes a Broden dataset's attributes
(label tables, mask size, categories), so it can be dissected like the full set.
"""
from __future__ import annotations

from typing import Sequence

import torch

from replication import cache


class InMemoryDataset(torch.utils.data.Dataset):
    """A dataset's `(image, class_id)` samples (optionally a subset) decoded once into tensors.

    Training many small models on the same images would otherwise decode every PNG in every epoch.
    `fingerprint` extends the source's with the chosen indices, so cached models stay keyed by data.
    """

    def __init__(self, dataset, indices: Sequence[int] | None = None, *, batch_size: int = 256):
        indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
        subset = torch.utils.data.Subset(dataset, indices)
        images, labels = [], []
        for batch_images, batch_labels in torch.utils.data.DataLoader(subset, batch_size=batch_size):
            images.append(batch_images)
            labels.append(batch_labels)
        self.images, self.targets = torch.cat(images), torch.cat(labels)
        source = getattr(dataset, "fingerprint", type(dataset).__name__)
        self.fingerprint = {"source": source, "indices": cache.config_hash(indices)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


class AttributeSubset(torch.utils.data.Subset):
    """A `Subset` that also exposes the wrapped dataset's attributes (a Broden dataset's label tables,
    mask size, categories), so a seeded subset of images can be dissected like the full set, or
    streamed from disk for training when the images are too many to decode into memory."""

    @property
    def fingerprint(self):
        """The source's fingerprint and the chosen indices (as `InMemoryDataset`'s), so cached models stay keyed by data."""
        return {"source": getattr(self.dataset, "fingerprint", type(self.dataset).__name__),
                "indices": cache.config_hash([int(i) for i in self.indices])}

    def __getattr__(self, name: str):
        if name in ("dataset", "indices") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def seeded_indices(n: int, count: int | None, *, seed: int = 0) -> list[int] | None:
    """`count` of range(n) drawn without replacement (seeded, sorted); None (= all) when count is None or >= n."""
    if count is None or count >= n:
        return None
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def seeded_subset(dataset, count: int | None, *, seed: int = 0):
    """`seeded_indices` of `dataset` as an `AttributeSubset`; the dataset itself when all are kept."""
    indices = seeded_indices(len(dataset), count, seed=seed)
    return dataset if indices is None else AttributeSubset(dataset, indices)


def split_indices(n: int, fraction: float, *, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of range(n) into (kept, held out), `fraction` held out (at least one each)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = min(max(1, round(n * fraction)), n - 1)
    return sorted(order[held:]), sorted(order[:held])


class InMemoryItems(torch.utils.data.Dataset):
    """Every item of a (Broden) dataset decoded once and kept, with the dataset's attributes exposed.

    Dissecting many models and layers on the same images would otherwise decode every image and mask
    PNG once per layer and model.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.items = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]

    def __getattr__(self, name: str):
        if name in ("dataset", "items") or name.startswith("__"):  # e.g. the loader's __getitems__ probe
            raise AttributeError(name)
        return getattr(self.dataset, name)

"""The images NAD reads: each class's images as one tensor (the search reads them every epoch) and
the seeded 2x2 mosaics of four classes that the hit rate is measured on (spec section 6.1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from replication.runtime import resolve_device

def image_and_label(item: Any) -> tuple[torch.Tensor, int | None]:
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
            chunks.append(torch.stack([image_and_label(dataset[int(i)])[0] for i in index[start:start + batch_size]]))
        out[int(class_id)] = torch.cat(chunks).to(resolve_device(device))
    return out


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

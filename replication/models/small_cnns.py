"""Small CNNs for synthetic tasks.

`TwoLayerCNN` is the network of CGL's synthetic experiment: two 3x3 conv layers with 128 and 256
filters [P]. Everything else about it is unreported [U]; the choices here ([I]) are ReLU after each
conv, a 2x2 max-pool after conv1, global pooling after conv2 and one linear classifier. The conv
modules are named `conv1`, `conv2` so they can be hooked (pre-activation outputs) and dissected.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

GLOBAL_POOLS = {"max": nn.AdaptiveMaxPool2d, "avg": nn.AdaptiveAvgPool2d}


class TwoLayerCNN(nn.Module):
    """conv1 -> ReLU -> max-pool 2 -> conv2 -> ReLU -> global pool -> linear."""

    def __init__(
        self,
        num_classes: int = 2,
        *,
        widths: Sequence[int] = (128, 256),
        kernel_size: int = 3,
        global_pool: str = "max",
        in_channels: int = 3,
    ):
        super().__init__()
        if len(widths) != 2:
            raise ValueError(f"TwoLayerCNN takes two conv widths, got {tuple(widths)}; the paper uses (128, 256).")
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {sorted(GLOBAL_POOLS)}, got {global_pool!r}.")
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size, padding=padding)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(widths[0], widths[1], kernel_size, padding=padding)
        self.relu2 = nn.ReLU()
        self.pool2 = GLOBAL_POOLS[global_pool](1)
        self.classifier = nn.Linear(widths[1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.pool1(self.relu1(self.conv1(images)))
        features = self.pool2(self.relu2(self.conv2(features)))
        return self.classifier(features.flatten(1))

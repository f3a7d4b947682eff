"""Notebook 02's figures: images with LAP's maps next to the explainers', and deletion / insertion curves."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from replication.data.broden import IMAGENET_MEAN, IMAGENET_STD


def _pixels(image: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_maps(images: torch.Tensor, masks: torch.Tensor, maps: Mapping[str, torch.Tensor], *,
              methods: Sequence[str] | None = None, count: int = 6, title: str = "") -> plt.Figure:
    """One row per image: the image with its evidence mask outlined, then each method's map (scaled to its
    own range per image) with the same outline."""
    methods = list(methods or maps)
    count = min(count, len(images))
    figure, axes = plt.subplots(count, len(methods) + 1, figsize=(1.6 * (len(methods) + 1), 1.6 * count), squeeze=False)
    for row in range(count):
        outline = masks[row, 0].numpy()
        axes[row, 0].imshow(_pixels(images[row]))
        for column, method in enumerate(methods, start=1):
            axes[row, column].imshow(maps[method][row].numpy(), cmap="inferno")
        for axis in axes[row]:
            axis.contour(outline, levels=[0.5], colors="cyan", linewidths=0.8)
            axis.set_xticks([])
            axis.set_yticks([])
    for column, name in enumerate(["image (evidence outlined)", *methods]):
        axes[0, column].set_title(name.replace("_", " "), fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


def plot_curves(curves: Mapping[tuple[str, str, str, str], torch.Tensor], network: str, model: str = "LAP") -> plt.Figure:
    """Mean deletion and insertion curves (probability of the predicted class) per method on one model."""
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for axis, mode in zip(axes, ("deletion", "insertion")):
        for (net, label, method, kind), curve in curves.items():
            if net == network and label == model and kind == mode:
                fraction = np.linspace(0, 1, len(curve))
                axis.plot(fraction, curve.numpy(), label=method.replace("_", " "),
                          linewidth=2.2 if method == "LAP" else 1.2, linestyle=":" if method == "random" else "-")
        axis.set_xlabel(f"fraction of pixels {'removed' if mode == 'deletion' else 'revealed'}")
        axis.set_ylabel("p(predicted class)")
        axis.set_title(f"{network}, {model} model: {mode}")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    return figure

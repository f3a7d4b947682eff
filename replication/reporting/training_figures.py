"""What training produced: learning curves and confusion matrices (notebook 00's baselines)."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def plot_learning_curves(histories: pd.DataFrame):
    """Train and val accuracy (%) per epoch, one panel per arch, one line pair per seed; `histories`
    has the columns arch, seed, epoch, train_acc, val_acc (fractions), as `Baselines.histories`."""
    archs = list(dict.fromkeys(histories["arch"]))
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 3.5), sharey=True, squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for (seed, run), colour in zip(histories[histories["arch"] == arch].groupby("seed"), plt.cm.tab10.colors):
            ax.plot(run["epoch"], 100 * run["val_acc"], color=colour, label=f"seed {seed} val")
            ax.plot(run["epoch"], 100 * run["train_acc"], color=colour, ls="--", lw=1, label=f"seed {seed} train")
        ax.set_title(arch)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    return fig


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], *, title: str = ""):
    """Row-normalised confusion matrix (true class rows, predicted columns), counts written in the cells."""
    confusion = np.asarray(confusion)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = 0.45 * len(class_names) + 2
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (row, col), count in np.ndenumerate(confusion):
        if count:
            ax.text(col, row, str(count), ha="center", va="center", fontsize=6,
                    color="white" if rates[row, col] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_title(title)
    return fig

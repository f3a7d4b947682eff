"""Notebook 01's figures, CW's figures adapted: top images per concept axis (CW Fig. 2), similarity heat
maps ordered by the tree (Fig. 5: BN / flat CW / hierarchical CW), purity AUC per node and per layer
(Fig. 6), the axis correlation matrices (Fig. 7), and the alignment objective per rotation update."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from replication.data.broden import IMAGENET_MEAN, IMAGENET_STD


def _show(image: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_top_images(top: pd.DataFrame, images: torch.Tensor, nodes: Sequence[str], *, k: int = 6, title: str = ""):
    """One row per node: the `k` val images with the highest activation on its axis (`metrics.top_images`)."""
    fig, axes = plt.subplots(len(nodes), k, figsize=(1.2 * k, 1.25 * len(nodes)), squeeze=False)
    for row, node in enumerate(nodes):
        chosen = top[(top.node == node) & (top["rank"] < k)].sort_values("rank").image.tolist()
        for column in range(k):
            ax = axes[row, column]
            ax.axis("off")
            if column < len(chosen):
                ax.imshow(_show(images[chosen[column]]))
        axes[row, 0].set_title(node, fontsize=8, loc="left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_similarity(matrices: Mapping[str, pd.DataFrame], *, title: str = "Normalised similarity Q of the leaves"):
    """Heat maps of Q (leaves in tree order, one panel per variant), off-diagonal mean in each title."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 4), squeeze=False)
    for ax, (name, q) in zip(axes[0], matrices.items()):
        values = q.to_numpy()
        image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
        off = values[~np.eye(len(values), dtype=bool)].mean()
        ax.set_xticks(range(len(q)), q.columns, rotation=90, fontsize=7)
        ax.set_yticks(range(len(q)), q.index, fontsize=7)
        ax.set_title(f"{name}\nmean off-diagonal {off:.2f}", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title)
    return fig


def plot_auc(auc: pd.DataFrame, *, by: str = "variant", title: str = "Purity AUC per node (val crops)"):
    """Grouped bars of the AUC per node (mean ± SD over the rows of each group, e.g. seeds)."""
    grouped = auc.groupby(["node", by], sort=False).auc.agg(["mean", "std"]).unstack(by)
    nodes = list(dict.fromkeys(auc.node))
    groups = list(dict.fromkeys(auc[by]))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(nodes)), 3.5))
    for i, group in enumerate(groups):
        ax.bar(np.arange(len(nodes)) + (i - (len(groups) - 1) / 2) * width, grouped["mean"][group].reindex(nodes),
               width, yerr=grouped["std"][group].reindex(nodes).fillna(0), capsize=2, label=str(group))
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(nodes)), nodes, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="AUC (mean ± SD over seeds)", ylim=(0.3, 1.0), title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_correlation(matrices: Mapping[str, pd.DataFrame], *, title: str = "|correlation| of the concept axes (val images)"):
    """Absolute correlation matrices of the concept axes (BN: the best units), one panel per variant."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices), 3.4), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        image = ax.imshow(matrix.to_numpy(), vmin=0, vmax=1, cmap="magma")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks(range(len(matrix)), matrix.index, fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title)
    return fig


def plot_alignment_trace(trace: pd.DataFrame, *, title: str = "Alignment objective per rotation update"):
    """Per network, the objective F = <G, R> before the first and after the last Cayley step of every
    rotation update (G that update's accumulated gradient; lower is better aligned), one line per run;
    skipped updates marked with a cross. F also grows in size while sum_G's moving average warms up
    from 0, so only a plateau after many updates says the alignment converged."""
    networks = list(dict.fromkeys(trace.network))
    fig, axes = plt.subplots(1, len(networks), figsize=(5 * len(networks), 3.4), squeeze=False)
    for ax, network in zip(axes[0], networks):
        for name, run in trace[trace.network == network].groupby("name", sort=False):
            steps = run[run.cayley_step > 0].groupby("update")
            line, = ax.plot(steps.before.first().index, steps.before.first(), "--", alpha=0.6)
            ax.plot(steps.after.last().index, steps.after.last(), "-", color=line.get_color(), label=f"{name} (after)")
            skipped = run[run.skipped]["update"].unique()
            ax.plot(skipped, np.zeros(len(skipped)), "x", color=line.get_color())
        ax.set_title(network)
        ax.set_xlabel("rotation update")
        ax.set_ylabel("F = <G, R> (dashed: before)")
        ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return fig

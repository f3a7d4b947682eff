"""Notebook 05's figures: the searches' traces, hit rate and path size against depth, path-similarity heat maps."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from replication.methods.gated_paths.experiment import ArchitectureResult, Searches
from replication.methods.gated_paths.metrics import class_hit_rates

def plot_hit_rates(results: Mapping[str, ArchitectureResult], *, chance: float = 0.25):
    """Hit rate against normalised depth per network (own paths solid, shifted-path control dashed)."""
    fig, ax = plt.subplots()
    for index, (arch, r) in enumerate(results.items()):
        colour = f"C{index}"
        per_class = class_hit_rates(r.hits)
        ax.errorbar(r.hit_summary["depth"], per_class.mean(), yerr=per_class.sem(), color=colour,
                    marker="o", ms=3, capsize=2, label=f"{arch} ({r.family})")
        ax.plot(r.control_summary["depth"], class_hit_rates(r.control_hits).mean(), color=colour, ls="--", lw=1)
    ax.axhline(chance, color="grey", lw=1, ls=":", label="chance")
    ax.set(xlabel="normalised depth of the gate location", ylabel="hit rate (mean ± SE over classes)",
           title="Class paths localise their class in 2x2 mosaics (dashed: another class's path)")
    ax.legend(fontsize=8)
    return fig


def plot_units_kept(results: Mapping[str, ArchitectureResult]):
    """Fraction of units on the class paths per gate location (mean over classes) against depth."""
    fig, ax = plt.subplots()
    for arch, r in results.items():
        kept = r.paths.units_kept().groupby("layer")["fraction"].agg(["mean", "std"])
        depth = kept.index / max(len(kept) - 1, 1)
        ax.errorbar(depth, kept["mean"], yerr=kept["std"], marker="o", ms=3, capsize=2, label=arch)
    ax.set(xlabel="normalised depth of the gate location", ylabel="fraction of units on the path",
           ylim=(0, 1), title="Path size per layer (mean ± std over classes)")
    ax.legend(fontsize=8)
    return fig


def plot_similarity(results: Mapping[str, ArchitectureResult], names: Sequence[str], order: Sequence[int]):
    """Path-similarity heat maps, classes in `order` (rows of the PathSet) labelled by `names`."""
    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results) + 1.5, 4.4), squeeze=False)
    labels = [names[i] for i in order]
    for index, (ax, (arch, r)) in enumerate(zip(axes[0], results.items())):
        matrix = r.similarity[list(order)][:, list(order)].numpy()
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(arch, fontsize=9)
        ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(order)), labels if index == 0 else [], fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.7, label="path similarity (mean IoU)")
    return fig


def plot_search_traces(searches: Searches):
    """Per network, against the search steps taken (mean over classes): the objective, the share of
    path decisions flipped per epoch and the share still equal to the random initial ones."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for index, (name, path_set) in enumerate(searches.paths.items()):
        trace = path_set.trace.sort_values(["class_id", "epoch"]).assign(
            step=lambda t: t.groupby("class_id")["steps"].cumsum())
        mean = trace.groupby("epoch")[["step", "loss", "flip_rate", "init_agreement"]].mean()
        for ax, column in zip(axes, ("loss", "flip_rate", "init_agreement")):
            ax.plot(mean["step"], mean[column], color=f"C{index}", lw=1.2, label=name)
    rule = next(iter(searches.paths.values())).config.get("stop_flip_rate")
    if rule:
        axes[1].axhline(rule, color="grey", ls=":", lw=1, label="stopping rate")
    axes[2].axhline(0.5, color="grey", ls=":", lw=1, label="chance")
    for ax, label in zip(axes, ("objective (mean over classes)", "decisions flipped in the epoch",
                                "decisions equal to the initial ones")):
        ax.set(xlabel="search steps", ylabel=label)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Path search: objective, gate flips and distance from the random start")
    fig.tight_layout()
    return fig

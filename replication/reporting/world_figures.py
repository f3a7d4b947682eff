"""Figures and tables that show what a Broden-format dataset (ConceptWorld or real Broden) contains."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from replication import io
from replication.data.broden import PIXEL_CATEGORIES, BrodenDataset
from replication.data.concept_world import IOU_CEILING_TARGETS

OVERLAY_ALPHA = 0.9
BACKDROP_FADE = 0.7  # overlays sit on a faded copy of the image so the labels stand out


def _display_image(dataset: BrodenDataset, sample: dict) -> np.ndarray:
    """Undo the dataset's normalisation so an image can be shown."""
    mean = torch.as_tensor(dataset.mean).view(3, 1, 1)
    std = torch.as_tensor(dataset.std).view(3, 1, 1)
    return (sample["image"] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _category_planes(dataset: BrodenDataset, sample: dict, category: str) -> np.ndarray:
    """The label planes of one pixel category in a sample (0 = none), as P×sh×sw."""
    planes = sample["pixel_labels"].numpy()
    present = [c for c in PIXEL_CATEGORIES if c in dataset.pixel_categories]
    if category not in present:
        return np.zeros((0, *planes.shape[1:]), dtype=np.int64)
    primary = dataset.primary_category.numpy()
    wanted = dataset.categories.index(category)
    # Planes are ordered color, object, material, part...; select by the labels' primary category.
    keep = [p for p in planes if p.any() and (primary[p[p > 0]] == wanted).any()]
    return np.stack(keep) if keep else np.zeros((0, *planes.shape[1:]), dtype=np.int64)


def example_grid(
    dataset: BrodenDataset, indices: Sequence[int], categories: Sequence[str] = ("object", "part", "color", "material")
):
    """One row per image: the image, then one overlay per pixel category with its labels named."""
    columns = 1 + len(categories)
    fig, axes = plt.subplots(len(indices), columns, figsize=(2.1 * columns, 2.2 * len(indices)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for row, index in enumerate(indices):
        sample = dataset[index]
        image = _display_image(dataset, sample)
        image_labels = [dataset.label_names[int(n)] for n in sample["image_labels"] if int(n) > 0]
        axes[row, 0].imshow(image)
        axes[row, 0].set_title("; ".join(image_labels), fontsize=7)
        small = image[:: image.shape[0] // dataset.mask_size[0], :: image.shape[1] // dataset.mask_size[1]]
        for column, category in enumerate(categories, start=1):
            axis = axes[row, column]
            axis.imshow(small * (1 - BACKDROP_FADE) + BACKDROP_FADE)
            names = []
            for plane in _category_planes(dataset, sample, category):
                for rank, label in enumerate(np.unique(plane[plane > 0])):
                    colour = np.array(cmap(int(label) % 20))
                    overlay = np.zeros((*plane.shape, 4))
                    overlay[plane == label] = [*colour[:3], OVERLAY_ALPHA]
                    axis.imshow(overlay)
                    names.append(dataset.label_names[int(label)])
            axis.set_title(f"{category}: " + ", ".join(sorted(set(names))[:3]), fontsize=7)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    fig.tight_layout()
    return fig


def coverage_figure(coverage: pd.DataFrame, quantile: float = 0.005):
    """Concept coverage (share of all mask pixels) per category, with the IoU ceiling it implies."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    order = list(dict.fromkeys(coverage["category"]))
    for position, category in enumerate(order):
        values = coverage.loc[coverage["category"] == category]
        jitter = np.linspace(-0.25, 0.25, len(values)) if len(values) > 1 else np.zeros(1)
        left.scatter(position + jitter, values["coverage"] * 100, s=14)
        right.scatter(position + jitter, values["iou_ceiling"], s=14)
    left.axhspan(0.25, 1.0, color="tab:green", alpha=0.15, label="IoU ceiling ≥ 0.5 band")
    left.axhline(quantile * 100, color="tab:green", lw=1)
    left.set_yscale("log")
    left.set_ylabel("coverage (% of all mask pixels)")
    left.legend(fontsize=8, loc="lower right")
    right.axhline(0.5, color="tab:green", lw=1)
    right.set_ylabel(f"IoU ceiling at top {quantile:.1%}")
    for axis in (left, right):
        axis.set_xticks(range(len(order)), order)
    fig.tight_layout()
    return fig


def coverage_summary(coverage: pd.DataFrame, targets: Mapping[str, float] = IOU_CEILING_TARGETS) -> pd.DataFrame:
    """Per category: concepts, those capped by design, median images per concept, median coverage, the
    category's IoU-ceiling target and the lowest ceiling among its other concepts (which should reach it)."""
    grouped = coverage.groupby("category", sort=False)
    uncapped = coverage[coverage["capped_by_design"] == ""].groupby("category", sort=False)
    return pd.DataFrame(
        {
            "concepts": grouped.size(),
            "capped by design": grouped["capped_by_design"].apply(lambda s: int((s != "").sum())),
            "median images": grouped["images"].median(),
            "median coverage %": grouped["coverage"].median() * 100,
            "ceiling target": pd.Series(targets),
            "lowest ceiling (uncapped)": uncapped["iou_ceiling"].min(),
        }
    ).loc[grouped.size().index].round(3)


def class_rules_table(world_root: str | Path) -> pd.DataFrame:
    """The classification task's rules as a table (class, superclass, and each concept family)."""
    classes = io.read_json(Path(world_root) / "classes.json")["classes"]
    rows = [{"class": c["name"], "superclass": c["superclass"], **c["rule"]} for c in classes]
    return pd.DataFrame(rows).fillna("")


def concept_tree_figure(tree: dict, max_depth: int = 3):
    """Draw the concept tree (root at the top) down to `max_depth` levels."""
    fig, axis = plt.subplots(figsize=(14, 4.2))

    def width(node: dict, depth: int) -> int:
        if depth >= max_depth or not node["children"]:
            return 1
        return sum(width(child, depth + 1) for child in node["children"])

    def place(node: dict, depth: int, left: float) -> float:
        children = node["children"] if depth < max_depth else []
        if not children:
            x = left + 0.5
        else:
            cursor, xs = left, []
            for child in children:
                xs.append(place(child, depth + 1, cursor))
                cursor += width(child, depth + 1)
            x = float(np.mean(xs))
            for child_x in xs:
                axis.plot([x, child_x], [-depth, -depth - 1], color="0.7", lw=0.8, zorder=1)
        style = {"object": "tab:blue", "part": "tab:orange"}.get(node["category"], "0.3")
        axis.text(x, -depth, node["name"], ha="center", va="center", fontsize=7, color="white",
                  rotation=90 if depth == max_depth else 0,
                  bbox={"boxstyle": "round,pad=0.2", "fc": style, "ec": "none"}, zorder=2)
        return x

    place(tree, 0, 0.0)
    axis.set_axis_off()
    axis.set_title("concept tree (grey: internal nodes, blue: objects, orange: parts)", fontsize=9)
    axis.margins(0.02, 0.15)
    return fig

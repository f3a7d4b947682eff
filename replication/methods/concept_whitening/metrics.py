"""CW's metrics (spec 01 section 6) as plain functions over axis activations, plus the hierarchy checks:
purity AUC per tree node over folds (6.3; an internal node's AUC is the parent-axis AUC of its subtree,
6.7), the normalised inter/intra concept similarity Q ordered by the tree (6.4) with within- and
across-branch means, the absolute correlation of the axes (6.5), concept importance by permutation
(6.6), top images per axis (6.2) and whether an axis's dissection label is its node.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

from replication.methods.concept_whitening.alignment import ConceptSets, ConceptTree
from replication.methods.concept_whitening.whitening import axis_activations
from replication.models.hooks import forward_until, get_module
from replication.models.surgery import eval_mode
from replication.runtime import resolve_device


@torch.no_grad()
def layer_outputs(model: nn.Module, layer: str, images: torch.Tensor, *, batch_size: int,
                  device: str | torch.device | None = None) -> torch.Tensor:
    """`layer`'s output (N × C × h × w, float32 on the CPU) for in-memory `images`, in eval mode."""
    device = resolve_device(device)
    parts = []
    with eval_mode(model), forward_until(model, layer) as forward:
        for start in range(0, len(images), batch_size):
            parts.append(forward(images[start:start + batch_size].to(device))[layer].float().cpu())
    return torch.cat(parts)


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of `scores` separating `positive` (booleans) from the rest: the Mann-Whitney U of the
    positives over the negatives, / (n+ n-) (ties count one half)."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        raise ValueError(f"ROC-AUC needs positives and negatives; got {int(positive.sum())} of {len(positive)} positive.")
    return float(stats.mannwhitneyu(scores[positive], scores[~positive]).statistic / (positive.sum() * (~positive).sum()))


def axis_scores(maps: torch.Tensor, mode: str = "pool_max") -> torch.Tensor:
    """One score per image and channel (CW's activation `mode`), in float64."""
    return axis_activations(maps.double(), mode)


def node_positives(concepts: ConceptSets, tree: ConceptTree, node: str) -> np.ndarray:
    """Which crops belong to `node` (their leaf lies in its subtree)."""
    leaves = [tree.leaves.index(leaf) for leaf in tree.leaves_under(node)]
    return np.isin(concepts.leaf.numpy(), leaves)


def best_units(scores: torch.Tensor, concepts: ConceptSets, tree: ConceptTree) -> list[int]:
    """Per node, the unit whose activation separates the node's crops best (highest AUC): CW's "best
    filter" baseline for a network without concept axes. Choose on one split, score on another."""
    values = scores.numpy()
    return [int(np.argmax([roc_auc(node_positives(concepts, tree, node), values[:, unit])
                           for unit in range(values.shape[1])])) for node in tree.nodes]


def purity_auc(scores: torch.Tensor, concepts: ConceptSets, tree: ConceptTree, axes: Sequence[int], *, folds: int = 5,
               seed: int = 0) -> pd.DataFrame:
    """One row per node: the one-vs-rest ROC-AUC of axis `axes[i]` for node i (positives: crops of its
    subtree; negatives: every other crop), mean and SD (ddof 1) over `folds` seeded folds of the crops."""
    values = scores.numpy()
    order = np.random.default_rng(seed).permutation(len(values))
    parts = np.array_split(order, folds)
    rows = []
    for node, axis in zip(tree.nodes, axes):
        positive = node_positives(concepts, tree, node)
        per_fold = [roc_auc(positive[p], values[p, axis]) for p in parts if 0 < positive[p].sum() < len(p)]
        rows.append({"node": node, "depth": tree.depth(node), "branch": tree.branch(node), "axis": int(axis),
                     "auc": float(np.mean(per_fold)), "auc_sd": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else np.nan,
                     "folds": len(per_fold)})
    return pd.DataFrame(rows)


def similarity_matrix(features: torch.Tensor, concepts: ConceptSets, tree: ConceptTree) -> pd.DataFrame:
    """CW's normalised similarity of the leaves (ordered by the tree): d_pq = mean cosine similarity of
    the feature vectors of crops of p and crops of q (self-pairs included in d_pp, as the official code),
    and Q_pq = |d_pq| / sqrt(|d_pp d_qq|), the diagonal 1 (the official code's form). Pass the concept
    axes' activations (notebook 01: their spatial means): a cosine over every channel of a rotated map
    is the same for any orthogonal rotation, so it could not tell two rotations apart."""
    unit = F.normalize(features.double(), dim=1)
    groups = [unit[concepts.leaf == tree.leaves.index(leaf)] for leaf in tree.leaves]
    d = np.array([[float((a @ b.T).mean()) for b in groups] for a in groups])
    q = np.abs(d) / np.sqrt(np.abs(np.outer(np.diag(d), np.diag(d))))
    np.fill_diagonal(q, 1.0)
    return pd.DataFrame(q, index=tree.leaves, columns=tree.leaves)


def branch_similarity(q: pd.DataFrame, tree: ConceptTree) -> pd.DataFrame:
    """Per leaf: its mean Q with the other leaves of its branch (within) and with leaves of other branches (across)."""
    rows = []
    for leaf in q.index:
        others = [o for o in q.columns if o != leaf]
        within = [o for o in others if tree.branch(o) == tree.branch(leaf)]
        across = [o for o in others if tree.branch(o) != tree.branch(leaf)]
        rows.append({"leaf": leaf, "branch": tree.branch(leaf),
                     "within": float(q.loc[leaf, within].mean()) if within else np.nan,
                     "across": float(q.loc[leaf, across].mean())})
    return pd.DataFrame(rows)


def mean_off_diagonal(matrix: pd.DataFrame) -> float:
    values = matrix.to_numpy()
    return float(values[~np.eye(len(values), dtype=bool)].mean())


def similarity_summary(q: pd.DataFrame, tree: ConceptTree) -> dict[str, float]:
    """The normalised inter/intra ratio (mean off-diagonal Q [I]) and the mean within- and across-branch Q."""
    branches = branch_similarity(q, tree)
    return {"inter_intra": mean_off_diagonal(q), "within_branch": float(branches.within.mean()),
            "across_branch": float(branches.across.mean())}


def axis_correlation(scores: torch.Tensor, tree: ConceptTree) -> pd.DataFrame:
    """Absolute Pearson correlation of the concept axes' activations over images (nodes x nodes)."""
    matrix = np.abs(np.corrcoef(scores.numpy().T))
    return pd.DataFrame(np.nan_to_num(matrix), index=list(tree.nodes), columns=list(tree.nodes))


def top_images(scores: torch.Tensor, tree: ConceptTree, *, k: int = 10) -> pd.DataFrame:
    """Per node, the indices of the `k` images with the highest activation on its axis (rank 0 first)."""
    top = torch.topk(scores, min(k, len(scores)), dim=0).indices.numpy()
    return pd.DataFrame([{"node": node, "rank": rank, "image": int(top[rank, i])}
                         for i, node in enumerate(tree.nodes) for rank in range(top.shape[0])])


@torch.no_grad()
def concept_importance(model: nn.Module, layer: str, images: torch.Tensor, labels: torch.Tensor, axes: Sequence[int],
                       tree: ConceptTree, *, batch_size: int, seed: int = 0, permutations: int = 1,
                       device: str | torch.device | None = None) -> pd.DataFrame:
    """CW's concept importance: per node, the cross-entropy on `images` after axis `axes[i]`'s map is
    permuted across the images, divided by the original cross-entropy [I: the paper's per-class balanced
    binary loss is replaced by the task's cross-entropy]; `importance` is the mean over `permutations`
    seeded permutations and `importance_sd` their SD (ddof 1; NaN for one)."""
    if permutations < 1:
        raise ValueError(f"concept importance needs permutations >= 1, got {permutations}.")
    device = resolve_device(device)
    maps = layer_outputs(model, layer, images, batch_size=batch_size, device=device)
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(len(images), generator=generator) for _ in range(permutations)]
    swap: dict[str, object] = {}

    def replace(_module, _inputs, output):
        if not swap:
            return output
        output = output.clone()
        output[:, swap["axis"]] = swap["maps"].to(output.device, output.dtype)
        return output

    def loss() -> float:
        total = 0.0
        for start in range(0, len(images), batch_size):
            if swap:
                swap["maps"] = maps[swap["order"][start:start + batch_size], swap["axis"]]
            logits = model(images[start:start + batch_size].to(device)).float().cpu()
            total += float(F.cross_entropy(logits, labels[start:start + batch_size], reduction="sum"))
        return total / len(images)

    handle = get_module(model, layer).register_forward_hook(replace)
    try:
        with eval_mode(model):
            original = loss()
            rows = []
            for node, axis in zip(tree.nodes, axes):
                ratios = []
                for order in orders:
                    swap.update(axis=axis, order=order)
                    ratios.append(loss() / original)
                    swap.clear()
                rows.append({"node": node, "axis": int(axis), "importance": float(np.mean(ratios)),
                             "importance_sd": float(np.std(ratios, ddof=1)) if len(ratios) > 1 else np.nan})
    finally:
        handle.remove()
    return pd.DataFrame(rows)


def axis_labels(units: pd.DataFrame, axes: Sequence[int], tree: ConceptTree) -> pd.DataFrame:
    """Per node: the dissection label (best object concept) and IoU of its axis, and whether that label
    lies in the node's subtree (an object labels its own axis, a superclass one of its objects)."""
    table = units.set_index("unit")
    rows = []
    for node, axis in zip(tree.nodes, axes):
        label = str(table.loc[axis, "label"])
        rows.append({"node": node, "depth": tree.depth(node), "axis": int(axis), "label": label,
                     "iou": float(table.loc[axis, "iou"]), "matches": label in tree.leaves_under(node)})
    return pd.DataFrame(rows)

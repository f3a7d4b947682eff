"""Concept alignment during training: the concept tree and its image sets, the hierarchical objectives
and the step callback that rotates every CW layer every `interval` batches (spec 01 sections 3.4, 3.7).

Objectives [I] (spec 3.7), each a setting of `ConceptAlignment`:
- "flat" (H0): CW's objective over every tree node, node n aligned with axis a(n);
- "ancestor" (H1): also, images of child c activate the axis of its parent p with weight λ_h: row a(p)
  of the gradient receives λ_h x (c's gradient row), computed with the same activation mode;
- "matched" (H0w, the control of H1): flat CW with row a(p) weighted 1 + λ_h x (p's children). The
  gradient row does not depend on the target axis and a parent's set is the union of its children's
  crops, so H1's row a(p) is, in expectation, flat CW's scaled by that weight: H1 over H0w is what the
  tree adds beyond re-weighting the parent rows in the Cayley step.
In one alignment call every node contributes one concept batch, counted for its own axis (the official
per-concept counter); row j of the raw gradient is the sum of the contributions aimed at axis j, smoothed
into sum_G once per call, and the update divides row j by its counter (1.001 here). For the flat objective
this is the official update (`IterNormRotation.update_rotation_matrix` after one batch per concept, as its
training loop sends), except that the call runs after the step's SGD update instead of before the next
one. The official code divides a moving average by the batch count, which is only that row (÷ 1.001) for
one batch per concept; several batches per concept between updates would shrink the row, not average it.
For "ancestor" a parent's row also holds its children's weighted rows without counting them (the
gradient of the summed objective). H2, the subspace variant, belongs to a later paper (MGCW) and is not
implemented.
"""
from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from replication import io
from replication.data.classification import ConceptImageDataset
from replication.data.world_statistics import concept_image_sets
from replication.methods.concept_whitening.whitening import ConceptWhitening
from replication.models.hooks import forward_until, get_module
from replication.models.surgery import eval_mode

OBJECTIVES = ("flat", "ancestor", "matched")


@dataclass(frozen=True)
class ConceptTree:
    """The concept nodes that own an axis, in breadth-first order (node i -> axis i), each with its
    parent among them (None for a top node) and its `leaves` (the labelled nodes whose images form its set)."""

    nodes: tuple[str, ...]
    parents: tuple[str | None, ...]

    def __post_init__(self) -> None:
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"concept tree nodes must be unique (one axis each), got {self.nodes}.")
        if len(self.parents) != len(self.nodes) or any(p is not None and p not in self.nodes for p in self.parents):
            raise ValueError("every parent of a concept tree node must be a node of the tree (or None).")

    def axis(self, node: str) -> int:
        return self.nodes.index(node)

    def parent(self, node: str) -> str | None:
        return self.parents[self.axis(node)]

    def children(self, node: str) -> list[str]:
        return [n for n, p in zip(self.nodes, self.parents) if p == node]

    @property
    def leaves(self) -> list[str]:
        return [n for n in self.nodes if not self.children(n)]

    def leaves_under(self, node: str) -> list[str]:
        """The leaves of the subtree rooted at `node` (itself when it is a leaf)."""
        children = self.children(node)
        return [node] if not children else [leaf for child in children for leaf in self.leaves_under(child)]

    def depth(self, node: str) -> int:
        parent = self.parent(node)
        return 0 if parent is None else 1 + self.depth(parent)

    def branch(self, node: str) -> str:
        """The top node above `node` (its branch of the tree)."""
        parent = self.parent(node)
        return node if parent is None else self.branch(parent)

    @classmethod
    def from_world(cls, root: str | Path, *, levels: int = 2) -> ConceptTree:
        """The top `levels` levels below the root of a ConceptWorld's `concept_tree.json` (2: the
        superclasses and their objects), breadth-first."""
        tree = io.read_json(Path(root) / "concept_tree.json")
        if levels < 1:
            raise ValueError(f"levels = {levels}: keep at least one level of the concept tree.")
        nodes, parents, frontier = [], [], [(child, None) for child in tree["children"]]
        for _ in range(levels):
            following = []
            for node, parent in frontier:
                nodes.append(node["name"])
                parents.append(parent)
                following += [(child, node["name"]) for child in node["children"]]
            frontier = following
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"levels = {levels} of {root}/concept_tree.json repeat names (shared parts); keep fewer levels.")
        return cls(tuple(nodes), tuple(parents))


def alignment_targets(tree: ConceptTree, objective: str = "flat", lambda_h: float = 1.0) -> dict[str, dict[int, float]]:
    """Per node, the axes its concept batch's gradient row is added to, with weights: its own axis
    (weight 1; for "matched" 1 + `lambda_h` x its children) and, for "ancestor", its parent's axis
    (weight `lambda_h`)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"alignment objective {objective!r}; choose one of {OBJECTIVES}.")
    targets = {}
    for node in tree.nodes:
        targets[node] = {tree.axis(node): 1.0 + (lambda_h * len(tree.children(node)) if objective == "matched" else 0.0)}
        parent = tree.parent(node)
        if objective == "ancestor" and parent is not None and lambda_h != 0:
            targets[node][tree.axis(parent)] = lambda_h
    return targets


@dataclass
class ConceptSets:
    """Concept crops in memory: `images` (N × 3 × H × W), the `leaf` index of each (into `tree.leaves`)
    and per node the indices of its set (the union of its leaves' crops, spec open point 3)."""

    tree: ConceptTree
    images: torch.Tensor
    leaf: torch.Tensor
    members: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        empty = [node for node in self.tree.nodes if len(self.members.get(node, ())) == 0]
        if empty:
            raise ValueError(f"concept nodes {empty} have no crops (after the min_pixels filter on this split); "
                             "every node needs images to align its axis: lower min_pixels, add crops or drop the node.")

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.images.numpy().tobytes())
        digest.update(self.leaf.numpy().tobytes())
        return digest.hexdigest()[:16]

    def sample(self, node: str, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` crops of `node`'s set drawn without replacement (all of them when fewer)."""
        members = self.members[node]
        chosen = members[torch.randperm(len(members), generator=generator)[:count]]
        return self.images[chosen]


def concept_sets(root: str | Path, tree: ConceptTree, *, split: str, per_leaf: int | None, image_size: int,
                 batch_size: int = 256, min_pixels: int = 16) -> ConceptSets:
    """The ConceptWorld crops of every leaf of `tree` on `split` (`world_statistics.concept_image_sets`,
    the `per_leaf` largest instances), decoded once at `image_size`; internal nodes get their leaves' crops."""
    sets = concept_image_sets(root, tree.leaves, split=split, limit=per_leaf, min_pixels=min_pixels)
    dataset = ConceptImageDataset(root, sets, image_size=image_size)
    images, leaves = [], []
    for batch, leaf in DataLoader(dataset, batch_size=batch_size):
        images.append(batch)
        leaves.append(leaf)
    leaf = torch.cat(leaves)
    members = {node: torch.cat([torch.nonzero(leaf == tree.leaves.index(name)).flatten() for name in tree.leaves_under(node)])
               for node in tree.nodes}
    return ConceptSets(tree, torch.cat(images), leaf, members)


def cw_layers(model: nn.Module, names: Sequence[str]) -> dict[str, ConceptWhitening]:
    layers = {name: get_module(model, name) for name in names}
    wrong = [name for name, layer in layers.items() if not isinstance(layer, ConceptWhitening)]
    if wrong:
        raise ValueError(f"{wrong} are not ConceptWhitening layers; replace them first (replace_with_cw).")
    return layers


@torch.no_grad()
def calibrate_statistics(model: nn.Module, names: Sequence[str], images: torch.Tensor, *, batch_size: int = 64) -> None:
    """Re-estimate the running mean and whitening matrix of the CW layers `names` from `images` (e.g. a
    few training batches): the cumulative average of the batches' statistics (BatchNorm's momentum=None),
    the rest of the model in eval mode and nothing else changed. The EMA (momentum 0.05) starts from
    mean 0 and W = I, so after a few dozen steps it still carries much of that start (0.95^10 = 60%)."""
    layers = cw_layers(model, names)
    device = next(model.parameters()).device
    momenta = {name: layer.momentum for name, layer in layers.items()}
    with eval_mode(model), forward_until(model, list(names)) as forward:
        try:
            for index, start in enumerate(range(0, len(images), batch_size)):
                for layer in layers.values():
                    layer.train()
                    layer.momentum = 1.0 / (index + 1)
                forward(images[start:start + batch_size].to(device))
        finally:
            for name, layer in layers.items():
                layer.momentum = momenta[name]


@dataclass
class ConceptAlignment:
    """The step callback that aligns every CW layer in `layers` every `interval` optimiser steps (CW Alg. 2):
    in eval mode, one batch of `concept_batch` crops per tree node (drawn with a generator seeded by `seed`
    and the step), each forwarded up to the last CW layer with the layers recording its gradient row; the
    rows are added to their `objective`'s target axes, smoothed into sum_G, and R takes `cayley_steps`
    Cayley steps. Runs after the step's SGD update (the official code aligns before the next batch's).
    With `calibration_images`, the first call first re-estimates the layers' running statistics from them
    (`calibrate_statistics`; `calibration` = their number, part of the cache identity when set)."""

    layers: tuple[str, ...]
    tree: ConceptTree
    concepts_fingerprint: str
    interval: int = 20
    objective: str = "flat"
    lambda_h: float = 1.0
    concept_batch: int = 64
    cayley_steps: int = 2
    seed: int = 0
    concepts: ConceptSets | None = field(default=None, repr=False, metadata={"cache_key": False})
    name: str = "concept_alignment"
    revision: int = 2  # the update's code revision, part of the cache identity (2: per-concept counter)
    calibration: int = field(default=0, metadata={"cache_key": "if_set"})
    calibration_images: torch.Tensor | None = field(default=None, repr=False, metadata={"cache_key": False})

    def __post_init__(self) -> None:
        if self.interval < 1 or self.concept_batch < 1 or self.cayley_steps < 1:
            raise ValueError(f"ConceptAlignment needs interval, concept_batch and cayley_steps >= 1; got "
                             f"{self.interval}, {self.concept_batch}, {self.cayley_steps}.")
        self.targets = alignment_targets(self.tree, self.objective, self.lambda_h)
        if self.calibration_images is not None and len(self.calibration_images) != self.calibration:
            raise ValueError(f"ConceptAlignment: calibration = {self.calibration} but {len(self.calibration_images)} "
                             "calibration images; pass their number.")
        self._calibrated = False

    def __call__(self, model: nn.Module, *, step: int, epoch: int) -> None:
        if step % self.interval == 0:
            self.align(model, step=step)

    @torch.no_grad()
    def align(self, model: nn.Module, *, step: int = 0) -> None:
        """One alignment call: gradient rows from one concept batch per node, then the rotation update."""
        if self.concepts is None:
            raise ValueError("ConceptAlignment has no concept images; pass concepts=concept_sets(...).")
        layers = cw_layers(model, self.layers)
        narrow = {name: layer.channels for name, layer in layers.items() if layer.channels < len(self.tree.nodes)}
        if narrow:
            raise ValueError(f"the concept tree has {len(self.tree.nodes)} nodes (one axis each) but CW layers {narrow} "
                             "have fewer channels; keep fewer tree levels or whiten a wider layer.")
        device = next(model.parameters()).device
        if self.calibration_images is not None and not self._calibrated:
            calibrate_statistics(model, self.layers, self.calibration_images, batch_size=self.concept_batch)
            self._calibrated = True
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows = {name: {} for name in layers}
        with eval_mode(model), forward_until(model, list(self.layers)) as forward:
            for node in self.tree.nodes:
                images = self.concepts.sample(node, self.concept_batch, generator).to(device)
                with ExitStack() as stack:
                    recorded = {name: stack.enter_context(layer.record(self.tree.axis(node))) for name, layer in layers.items()}
                    forward(images)
                for name, (gradient,) in recorded.items():
                    for axis, weight in self.targets[node].items():
                        rows[name][axis] = rows[name].get(axis, 0) + weight * gradient
        for name, layer in layers.items():
            layer.accumulate(rows[name])
            layer.update_rotation(steps=self.cayley_steps)


def node_table(tree: ConceptTree, sets: Mapping[str, ConceptSets]) -> list[dict[str, Any]]:
    """One row per node: axis, parent, depth, branch and the size of its set in each of `sets`."""
    return [{"node": node, "axis": tree.axis(node), "parent": tree.parent(node) or "", "depth": tree.depth(node),
             "branch": tree.branch(node), **{f"{split}_images": len(s.members[node]) for split, s in sets.items()}}
            for node in tree.nodes]

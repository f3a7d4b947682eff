"""How class paths relate: to each other (per-layer IoU, similarity, diversity and its jackknife SE,
similarity within vs between class groups, misclassification ranks; spec section 6.3) and to the
concepts that Network Dissection finds on their units (v1's concept diversity, reconstructed)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from replication.methods.gated_paths.search import PathSet

def path_iou(paths: Sequence[torch.Tensor], *, empty_value: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer IoU between every pair of class paths: (L, K, K) IoU and (L, K, K) 'both empty' mask.

    Official IoU is 0/0 when both paths are empty at a layer; we use `empty_value` (spec default 1) [I].
    """
    ious, empties = [], []
    for path in paths:
        p = path.float()
        inter = p @ p.T
        sizes = p.sum(1)
        union = sizes[:, None] + sizes[None, :] - inter
        empty = union == 0
        ious.append(torch.where(empty, torch.full_like(inter, empty_value), inter / union.clamp_min(1)))
        empties.append(empty)
    return torch.stack(ious), torch.stack(empties)


def path_similarity(paths: Sequence[torch.Tensor], *, empty_value: float = 1.0) -> torch.Tensor:
    """s(c, c') = mean over layers of the per-layer path IoU (spec section 6.3), a (K, K) matrix."""
    return path_iou(paths, empty_value=empty_value)[0].mean(0)


def path_diversity(similarity: torch.Tensor) -> float:
    """v1's 'diversity of concepts' reconstructed [I]: 1 - mean off-diagonal path similarity."""
    k = similarity.shape[0]
    if k < 2:
        raise ValueError("path diversity needs at least two classes")
    off = similarity[~torch.eye(k, dtype=torch.bool)]
    return float(1 - off.mean())


def group_similarity(similarity: torch.Tensor, groups: Sequence[Any]) -> dict[str, float]:
    """Mean path similarity of class pairs in the same group (e.g. superclass) vs different groups."""
    groups = np.asarray(groups)
    if len(groups) != similarity.shape[0]:
        raise ValueError(f"got {len(groups)} group labels for {similarity.shape[0]} classes")
    same = torch.as_tensor(groups[:, None] == groups[None, :])
    off = ~torch.eye(len(groups), dtype=torch.bool)
    within, between = similarity[same & off], similarity[~same]
    return {"within": float(within.mean()) if within.numel() else float("nan"),
            "between": float(between.mean()) if between.numel() else float("nan"),
            "n_within_pairs": int(within.numel()) // 2, "n_between_pairs": int(between.numel()) // 2}


def misclassification_ranks(similarity: torch.Tensor, classes: Sequence[int], true: Sequence[int],
                            predicted: Sequence[int]) -> np.ndarray:
    """For each misclassified image, the normalised mid-rank of s(true, predicted) among s(true, c'), c' != true.

    1 = the predicted class has the path most similar to the true class's, 0 = least similar; a
    predicted class drawn at random gives 0.5 in expectation (spec section 6.3 replication metric) [I].
    Pairs whose classes have no path are an error.
    """
    position = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    if k < 3:
        raise ValueError("misclassification ranks need paths for at least three classes")
    ranks = []
    for t, p in zip(true, predicted):
        if t == p:
            raise ValueError(f"image with true class {t} was classified correctly; pass misclassified images only")
        if t not in position or p not in position:
            raise ValueError(f"class {t if t not in position else p} has no path; restrict to classes {list(classes)}")
        row = similarity[position[t]].clone()
        others = torch.ones(k, dtype=torch.bool)
        others[position[t]] = False
        target = row[position[p]]
        below = (row[others] < target).sum().item()
        ties = (row[others] == target).sum().item() - 1
        ranks.append((below + 0.5 * ties) / (k - 2))
    return np.asarray(ranks, dtype=float)


def path_diversity_se(similarity: torch.Tensor) -> float:
    """Jackknife standard error (over classes) of `path_diversity`."""
    k = similarity.shape[0]
    if k < 3:
        return float("nan")
    values = np.array([path_diversity(similarity[np.delete(np.arange(k), i)][:, np.delete(np.arange(k), i)])
                       for i in range(k)])
    return float(np.sqrt((k - 1) / k * np.sum((values - values.mean()) ** 2)))


def path_concepts(paths: PathSet, units: Mapping[str, pd.DataFrame], concepts: Mapping[int, Sequence[str]], *,
                  n_random: int = 100, seed: int = 0) -> pd.DataFrame:
    """v1's 'diversity of human concepts along paths', measured with dissection labels [I].

    `units[location]`: the dissection unit table of that gate location (columns unit, label,
    detector), for all gate locations or a subset (then only those count). Per class: how many path units are detectors, how many distinct concepts they
    detect, and which share of the class's own defining concepts (`concepts[c]`) label some detector
    on its path, against random unit sets of the same per-layer sizes (`n_random` draws, seeded)
    and against all units of the network.
    """
    unknown = sorted(set(units) - {loc.name for loc in paths.locations})
    if unknown or not units:
        raise ValueError(f"dissection unit tables must be keyed by gate locations {[l.name for l in paths.locations]}; "
                         f"got {sorted(units)}")
    chosen = [(i, loc) for i, loc in enumerate(paths.locations) if loc.name in units]
    labels = []  # per dissected location: label of each unit, '' where the unit is no detector
    for _, loc in chosen:
        table = units[loc.name].set_index("unit").sort_index()
        if len(table) != loc.channels:
            raise ValueError(f"dissection of {loc.name} has {len(table)} units, the gate has {loc.channels}")
        labels.append(np.where(table["detector"].to_numpy(bool), table["label"].astype(str).to_numpy(), ""))
    rng = np.random.default_rng(seed)
    all_labels = set(np.concatenate(labels)) - {""}
    rows = []
    for k, class_id in enumerate(paths.classes):
        own = set(concepts.get(class_id, ()))
        on_path = [lab[paths.paths()[i][k].numpy()] for lab, (i, _) in zip(labels, chosen)]
        found = set(np.concatenate(on_path)) - {""}
        random_found = []
        for _ in range(n_random):
            drawn = set(np.concatenate([lab[rng.permutation(len(lab))[:len(chosen)]]
                                        for lab, chosen in zip(labels, on_path)])) - {""}
            random_found.append(len(own & drawn) / max(len(own), 1))
        rows.append({"class_id": class_id, "path_units": int(sum(len(c) for c in on_path)),
                     "path_detectors": int(sum((c != "").sum() for c in on_path)),
                     "distinct_concepts": len(found),
                     "own_concepts_found": len(own & found) / max(len(own), 1),
                     "own_concepts_found_random": float(np.mean(random_found)) if random_found else float("nan"),
                     "own_concepts_found_all_units": len(own & all_labels) / max(len(own), 1)})
    return pd.DataFrame(rows)


def random_paths_like(paths: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Random unit sets with exactly the per-class, per-layer sizes of `paths` ((K, C_l) bool each):
    the control that tells a path's structure from its size."""
    out = []
    for path in paths:
        ranks = torch.rand(path.shape, generator=generator).argsort(dim=1).argsort(dim=1)
        out.append(ranks < path.sum(1, keepdim=True))
    return out


def random_path_diversity(paths: Sequence[torch.Tensor], *, n_random: int = 100, seed: int = 0,
                          empty_value: float = 1.0) -> np.ndarray:
    """`path_diversity` of `n_random` same-size random path sets (`random_paths_like`), one value per draw."""
    generator = torch.Generator().manual_seed(seed)
    return np.array([path_diversity(path_similarity(random_paths_like(paths, generator), empty_value=empty_value))
                     for _ in range(n_random)])


def path_stability(path_sets: Sequence[PathSet], *, n_random: int = 20, seed: int = 0,
                   empty_value: float = 1.0) -> pd.DataFrame:
    """How reproducible a class's path is across searches of one network with different seeds.

    Per class: the path IoU (mean over layers) between the searches, averaged over every pair of
    searches (`stability`), next to the same for same-size random unit sets (`random`, `n_random`
    draws per search; what two unrelated paths of these sizes share by chance).
    """
    if len(path_sets) < 2:
        raise ValueError(f"path stability needs at least two searches of the network, got {len(path_sets)}")
    classes = path_sets[0].classes
    if any(p.classes != classes for p in path_sets):
        raise ValueError("the searches must cover the same classes in the same order")
    generator = torch.Generator().manual_seed(seed)

    def mean_pair_iou(sets: Sequence[Sequence[torch.Tensor]]) -> np.ndarray:
        values = [torch.stack([_row_iou(a, b, empty_value) for a, b in zip(sets[i], sets[j])]).mean(0)
                  for i in range(len(sets)) for j in range(i + 1, len(sets))]
        return torch.stack(values).mean(0).numpy()

    observed = mean_pair_iou([p.paths() for p in path_sets])
    random = np.mean([mean_pair_iou([random_paths_like(p.paths(), generator) for p in path_sets])
                      for _ in range(n_random)], axis=0)
    return pd.DataFrame({"class_id": classes, "stability": observed, "random": random})


def _row_iou(a: torch.Tensor, b: torch.Tensor, empty_value: float) -> torch.Tensor:
    """IoU of row k of `a` with row k of `b` ((K, C) bool each), `empty_value` where both are empty."""
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union == 0, torch.full_like(inter, empty_value), inter / union.clamp_min(1))

"""Paper 04's measurements: the basis interpretability scores S¹ and S² (shared spec section 5), the
one-hotness of a basis' thresholded projections (claim U1) and detection IoUs for the planted test.

S¹/S² of a basis with directions i: label each direction on the **train** split,
c*_i = argmax_c φ_i(c, K_t) (ties to the lowest label number; a direction whose train IoUs are all 0 is
unlabelled and adds 0), score it on the **val** split, φ_i(c*_i, K_v), where φ is the shared
dissection's IoU. Then

    S¹ = ∫_0^1 Σ_i 1[φ_i(c*_i, K_v) ≥ ξ] dξ = Σ_i φ_i(c*_i, K_v)
    S² = ∫_0^1 |{c : ∃ i, c*_i = c ∧ φ_i(c, K_v) ≥ ξ}| dξ = Σ_{c ∈ {c*_i}} max_{i : c*_i = c} φ_i(c, K_v)

(closed forms since ∫_0^1 1[a ≥ ξ] dξ = a on [0, 1]). `s_integrands` gives the two counts at one ξ (at
ξ = 0.04 Network Dissection's interpretable units and unique detectors), `integrated_scores` integrates
them exactly over their breakpoints, `s_scores` uses the closed forms; the tests check they agree.
Per category (`s_by_category`), directions are partitioned by the primary category of their label, so
the categories add up to the totals.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.optimize
import torch

from replication.analysis.dissection import Dissection


# ---------------------------------------------------------------- S¹ and S²
def train_labels(train: Dissection) -> np.ndarray:
    """c*_i per direction: the label number of the highest train IoU (lowest number on ties), -1 when
    every train IoU is 0 (unlabelled)."""
    iou = np.nan_to_num(train.iou, nan=-1.0)
    return np.where(iou.max(axis=1) > 0, iou.argmax(axis=1), -1)


def direction_table(train: Dissection, val: Dissection, dataset, labels=None) -> pd.DataFrame:
    """One row per direction: its label c*_i (chosen on `train`, or given as `labels`: label numbers,
    -1 = none, e.g. each IBD probe's own concept), the label's primary category in `dataset` (either
    split: they share the label set) and the IoUs φ_i(c*_i, ·) on the train and val dissections."""
    if train.iou.shape != val.iou.shape or train.label_names != val.label_names:
        raise ValueError(f"the train and val dissections differ in shape ({train.iou.shape} vs {val.iou.shape}) "
                         "or labels; dissect the same directions on two splits of one dataset.")
    chosen = train_labels(train) if labels is None else np.asarray(labels, dtype=np.int64)
    if chosen.shape != (train.iou.shape[0],) or chosen.max(initial=-1) >= train.iou.shape[1]:
        raise ValueError(f"labels must give one label number (< {train.iou.shape[1]}, -1 for none) per direction "
                         f"({train.iou.shape[0]}); got {chosen.shape[0] if chosen.ndim else 0} values.")
    rows, labelled = np.arange(len(chosen)), chosen >= 0
    safe = np.where(labelled, chosen, 0)
    primary = np.asarray(dataset.primary_category)
    return pd.DataFrame({
        "direction": rows,
        "label_number": chosen,
        "label": [train.label_names[c] if c >= 0 else "" for c in chosen],
        "category": [dataset.categories[primary[c]] if c >= 0 and primary[c] >= 0 else "" for c in chosen],
        "train_iou": np.where(labelled, np.nan_to_num(train.iou[rows, safe]), 0.0),
        "val_iou": np.where(labelled, np.nan_to_num(val.iou[rows, safe]), 0.0),
    })


def s_scores(table: pd.DataFrame) -> dict[str, float]:
    """S¹ and S² by their closed forms (Σ of val IoUs; Σ over distinct labels of the best val IoU)."""
    labelled = table[table.label_number >= 0]
    return {"s1": float(labelled.val_iou.sum()),
            "s2": float(labelled.groupby("label_number").val_iou.max().sum())}


def s_integrands(table: pd.DataFrame, xi: float) -> dict[str, int]:
    """The integrands at threshold ξ: directions with φ_i(c*_i, K_v) ≥ ξ (`detectors`) and the distinct
    labels among them (`unique_detectors`)."""
    labels = table.label_number.to_numpy()
    above = labels[(labels >= 0) & (table.val_iou.to_numpy() >= xi)]
    return {"detectors": len(above), "unique_detectors": len(np.unique(above))}


def integrated_scores(table: pd.DataFrame) -> dict[str, float]:
    """S¹ and S² as the integrals over ξ ∈ [0, 1] of `s_integrands`, computed exactly: the integrands are
    step functions, constant on each interval (a, b] between consecutive IoU values, equal there to
    their value at b."""
    points = np.unique(np.clip(np.concatenate([[0.0, 1.0], table.val_iou.to_numpy()]), 0.0, 1.0))
    s1 = s2 = 0.0
    for low, high in zip(points[:-1], points[1:]):
        counts = s_integrands(table, high)
        s1 += (high - low) * counts["detectors"]
        s2 += (high - low) * counts["unique_detectors"]
    return {"s1": s1, "s2": s2}


def s_by_category(table: pd.DataFrame, *, xi: float = 0.04) -> pd.DataFrame:
    """Per category of the directions' labels (and `total`): S¹, S², and the integrands at `xi`."""
    rows = []
    categories = [c for c in dict.fromkeys(table.category) if c]
    for category in [*categories, "total"]:
        part = table if category == "total" else table[table.category == category]
        rows.append({"category": category, **s_scores(part), **s_integrands(part, xi)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- one-hotness (U1)
@torch.no_grad()
def one_hotness(logits: torch.Tensor, *, dead_share: float = 0.001) -> dict[str, float]:
    """How one-hot y = sigmoid(logits) is over P × I pixels: mean entropy (bits) of q = y / ‖y‖₁,
    the share of pixels with exactly one y > 0.5, the share with none, the mean share of directions
    active per pixel (1/I when one-hot; near 1 when a fit collapsed to all directions on), and the
    number of directions active on fewer than `dead_share` of the pixels (dead directions, spec 04 section 8)."""
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty P × I matrix; got shape {tuple(logits.shape)}.")
    log_y = torch.nn.functional.logsigmoid(logits.double())
    log_q = log_y - log_y.logsumexp(dim=1, keepdim=True)  # q = y / ‖y‖₁ in log space: exact where all y are tiny
    entropy = -(log_q.exp() * log_q).sum(dim=1) / math.log(2)
    active = logits > 0
    per_pixel = active.sum(dim=1)
    return {
        "mean_entropy_bits": float(entropy.mean()),
        "max_entropy_bits": math.log2(logits.shape[1]),
        "one_hot_share": float((per_pixel == 1).double().mean()),
        "none_active_share": float((per_pixel == 0).double().mean()),
        "active_share": float(active.double().mean()),
        "dead_directions": int((active.double().mean(dim=0) < dead_share).sum()),
    }


# ---------------------------------------------------------------- detection IoUs
def detection_iou(fires: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """K × C IoU of each detector's positive set (`fires`, P × K booleans) with each concept (`truth`,
    P × C booleans) over the P samples; 0 where both are empty."""
    if fires.ndim != 2 or truth.ndim != 2 or fires.shape[0] != truth.shape[0]:
        raise ValueError(f"fires (P × K) and truth (P × C) need the same P; got {tuple(fires.shape)} and {tuple(truth.shape)}.")
    f, t = fires.double(), truth.double()
    intersection = f.T @ t
    union = f.sum(0)[:, None] + t.sum(0)[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros(())).numpy()


def best_threshold_iou(scores: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """K × C IoU of "score_k > t" with concept c at the best t for each pair (an oracle threshold): over
    the top-j samples of each direction, IoU_j = TP_j / (j + |c| − TP_j), maximised over j ≥ 1."""
    if scores.ndim != 2 or truth.ndim != 2 or scores.shape[0] != truth.shape[0]:
        raise ValueError(f"scores (P × K) and truth (P × C) need the same P; got {tuple(scores.shape)} and {tuple(truth.shape)}.")
    order = scores.double().argsort(dim=0, descending=True)  # P × K
    t = truth.double()
    taken = torch.arange(1, len(scores) + 1, dtype=torch.float64)[:, None]
    out = np.zeros((scores.shape[1], truth.shape[1]))
    for k in range(scores.shape[1]):
        hits = t[order[:, k]].cumsum(dim=0)  # P × C: true positives among the top j
        out[k] = (hits / (taken + t.sum(0) - hits)).max(dim=0).values.numpy()
    return out


def match_detectors(iou: np.ndarray) -> np.ndarray:
    """For each concept (column of a K × C IoU matrix), the detector (row) matched to it one-to-one so
    that the total IoU is largest (Hungarian assignment); needs K >= C."""
    if iou.shape[0] < iou.shape[1]:
        raise ValueError(f"{iou.shape[0]} detectors cannot be matched one-to-one to {iou.shape[1]} concepts.")
    rows, cols = scipy.optimize.linear_sum_assignment(iou, maximize=True)
    matched = np.empty(iou.shape[1], dtype=np.int64)
    matched[cols] = rows
    return matched


def matched_iou(iou: np.ndarray) -> np.ndarray:
    """Per concept, the IoU of the detector `match_detectors` pairs with it."""
    return iou[match_detectors(iou), np.arange(iou.shape[1])]

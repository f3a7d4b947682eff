"""Paper 01's claims T1-T6 (spec 01 section 2) judged through the claims kit.

Unit of replication: the training run (seed). Every treatment (BN kept, flat CW, hierarchical CW) is
applied to a whole network, so the nodes, leaves and classes of one run share one rotation, one set of
whitening statistics and one backbone: they are pseudo-replicates, reported only as descriptive numbers.
Each condition of T2-T5 is one value per seed (the run's mean over its nodes, leaves or classes), paired
over the seeds of a network; a network with a single seed (one run) is "not testable here" for those
conditions. T1 is an exact check of the update count (no test). T6 is T2-T5 on every network: confirmed
when each holds on two or more networks. Every test of the notebook is one Holm family.

The similarity matrix Q is computed on the concept axes only (`evaluate_network`): over all channels a
cosine is invariant to the rotation, so it could not tell flat from hierarchical CW.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from replication.methods.concept_whitening.experiment import MAIN
from replication.reporting.claims import (ClaimResult, ClaimTest, Judged, bound_effect, combine, conjunction,
                                          judge_tests, mean_spread, network_verdicts, paired_effect)

CLAIM_IDS = ("T1", "T2", "T3", "T4", "T5", "T6")
HIERARCHICAL, FLAT, BN, MATCHED = "ancestor", "flat", "bn", "matched"
ONE_RUN = "not testable here"


def _main_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs with CW at the network's main layer (the claims' runs; not the depth runs)."""
    return frame[frame.placement == MAIN]


def _per_seed(frame: pd.DataFrame, network: str, variant: str, column: str, keep: Sequence[str] | None = None,
              key: str = "node") -> pd.Series:
    """`column` per seed (the run's mean over its `key` units, only `keep` ones when given), for one
    network and variant."""
    chosen = frame[(frame.network == network) & (frame.variant == variant)]
    if keep is not None:
        chosen = chosen[chosen[key].isin(keep)]
    if chosen.empty:
        raise ValueError(f"no {column!r} for variant {variant!r} on {network}; run every variant of [cw].variants.")
    return chosen.groupby("seed")[column].mean()


def _per_unit(frame: pd.DataFrame, network: str, variant: str, key: str, column: str) -> pd.Series:
    """`column` per node, leaf or class, averaged over seeds (descriptive only)."""
    chosen = frame[(frame.network == network) & (frame.variant == variant)]
    return chosen.groupby(key, sort=False)[column].mean()


def leaf_rows(similarity: Mapping[str, pd.DataFrame], runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run and leaf: its mean off-diagonal Q (`inter_intra`) and its within- and across-branch
    means, from each run's similarity matrix (`similarity[name]`) and branch table."""
    rows = []
    for run in _main_runs(runs).itertuples():
        q = similarity[run.name]
        values = q.to_numpy()
        off = values[~np.eye(len(values), dtype=bool)].reshape(len(values), -1).mean(1)
        for leaf, value in zip(q.index, off):
            rows.append({"network": run.network, "seed": run.seed, "variant": run.variant, "leaf": leaf,
                         "inter_intra": float(value)})
    return pd.DataFrame(rows)


def replicated_networks(auc: pd.DataFrame) -> dict[str, bool]:
    """Per network (first-seen order): whether it has two or more seeds, i.e. testable over runs."""
    auc = _main_runs(auc)
    return {n: auc[auc.network == n].seed.nunique() >= 2 for n in dict.fromkeys(auc.network)}


def _contrast(branches: pd.DataFrame, network: str) -> pd.Series:
    """Per seed: mean over leaves of (within - across)-branch Q with H1 minus the same with flat CW."""
    gap = branches.assign(gap=branches.within - branches.across)
    return _per_seed(gap, network, HIERARCHICAL, "gap") - _per_seed(gap, network, FLAT, "gap")


def claim_tests(auc: pd.DataFrame, leaves: pd.DataFrame, branches: pd.DataFrame, classes: pd.DataFrame, *,
                auc_margin: float = 0.02, similarity_margin: float = 0.02, accuracy_tolerance: float = 1.0) -> list[ClaimTest]:
    """Every test of T2-T5 on each network with two or more seeds, paired over seeds (each seed's value is
    its run's mean over nodes, leaves or classes): T2 hierarchical CW's node AUC above the BN network's
    best filter, and within `auc_margin` of flat CW (bound); T3 (a) the internal nodes' (parent-axis)
    AUC higher with H1 than with H0 and, where it was run, than with the weight-matched flat CW (H0w:
    flat CW with the parent rows weighted as H1's), (b) the within- minus across-branch Q gap larger with
    H1 than with flat CW (H1 - H0 contrast); T4 mean off-diagonal Q of the concept axes lower with H1 than with BN, and
    not above flat CW's by more than `similarity_margin`; T5 val accuracy (mean over classes) of H1 minus
    BN above -`accuracy_tolerance` points."""
    auc, classes, branches = _main_runs(auc), _main_runs(classes), _main_runs(branches)
    tests = []
    for network, replicated in replicated_networks(auc).items():
        if not replicated:
            continue
        h1, h0, bn = (_per_seed(auc, network, v, "auc") for v in (HIERARCHICAL, FLAT, BN))
        tests.append(ClaimTest("T2", network, paired_effect(h1, bn.reindex(h1.index), unit="seeds"), "AUC H1 - BN best filter"))
        tests.append(ClaimTest("T2", network, bound_effect(h1 - h0.reindex(h1.index), unit="seeds", bound=-auc_margin),
                               f"AUC H1 - flat CW above -{auc_margin}"))
        internal = auc[(auc.network == network) & (auc.depth == 0)].node.unique()
        p1, p0 = (_per_seed(auc, network, v, "auc", keep=internal) for v in (HIERARCHICAL, FLAT))
        tests.append(ClaimTest("T3", network, paired_effect(p1, p0.reindex(p1.index), unit="seeds"),
                               "parent-axis AUC H1 - flat CW"))
        if ((auc.network == network) & (auc.variant == MATCHED)).any():
            pm = _per_seed(auc, network, MATCHED, "auc", keep=internal)
            tests.append(ClaimTest("T3", network, paired_effect(p1, pm.reindex(p1.index), unit="seeds"),
                                   "parent-axis AUC H1 - weight-matched flat CW"))
        tests.append(ClaimTest("T3", network, bound_effect(_contrast(branches, network), unit="seeds"),
                               "(within - across-branch Q) H1 - flat CW"))
        q1, q0, qb = (_per_seed(leaves, network, v, "inter_intra") for v in (HIERARCHICAL, FLAT, BN))
        tests.append(ClaimTest("T4", network, paired_effect(q1, qb.reindex(q1.index), unit="seeds", direction="lower"),
                               "inter/intra Q H1 - BN"))
        tests.append(ClaimTest("T4", network, bound_effect(q1 - q0.reindex(q1.index), unit="seeds", bound=similarity_margin,
                                                           direction="lower"), f"Q H1 - flat CW below +{similarity_margin}"))
        a1, ab = (_per_seed(classes, network, v, "accuracy") for v in (HIERARCHICAL, BN))
        tests.append(ClaimTest("T5", network, bound_effect(a1 - ab.reindex(a1.index), unit="seeds", bound=-accuracy_tolerance),
                               f"val accuracy H1 - BN (points) above -{accuracy_tolerance}"))
    return tests


def descriptive(auc: pd.DataFrame, leaves: pd.DataFrame, network: str) -> str:
    """A single run's node- and leaf-level differences (mean ± SD over units), for description only:
    the units of one run are not independent replicates."""
    auc = _main_runs(auc)
    h1, h0, bn = (_per_unit(auc, network, v, "node", "auc") for v in (HIERARCHICAL, FLAT, BN))
    q1, q0 = (_per_unit(leaves, network, v, "leaf", "inter_intra") for v in (HIERARCHICAL, FLAT))
    return (f"{network}: {ONE_RUN} (one run); descriptive, nodes/leaves of that run: AUC H1 - BN "
            f"{mean_spread(h1 - bn.reindex(h1.index), 'SD', 3)} nodes, AUC H1 - flat {mean_spread(h1 - h0.reindex(h1.index), 'SD', 3)}, "
            f"Q H1 - flat {mean_spread(q1 - q0.reindex(q1.index), 'SD', 3)} leaves")


def rotation_check(rotations: Mapping[str, Any]) -> pd.DataFrame:
    """T1's exact check per (network, seed): the rotation updates the H1 and H0 runs made and how many of
    them were accepted (not skipped), and the largest difference between their final rotations
    (`rotations[network, seed, variant]` = (rotation, updates, skipped updates))."""
    rows = []
    for (network, seed, variant), (rotation, updates, skipped) in rotations.items():
        if variant != HIERARCHICAL or (network, seed, FLAT) not in rotations:
            continue
        flat, flat_updates, flat_skipped = rotations[network, seed, FLAT]
        rows.append({"network": network, "seed": seed, "max_rotation_difference": float((rotation - flat).abs().max()),
                     "h1_updates": int(updates), "h1_accepted": int(updates) - int(skipped),
                     "h0_updates": int(flat_updates), "h0_accepted": int(flat_updates) - int(flat_skipped)})
    return pd.DataFrame(rows)


def _ours(judged: list[Judged]) -> str:
    return "; ".join(j.text(3) for j in judged)


def _t1(rotations: pd.DataFrame) -> tuple[str, str]:
    """T1's exact check: every H1 and H0 run made at least one accepted rotation update and the two final
    rotations differ. It fails when alignment never ran, every update was skipped or the hierarchical term
    left R unchanged (e.g. λ_h = 0); it is not evidence of an effect's size."""
    if rotations.empty:
        return "refuted", "no pair of H1 and H0 runs to compare"
    acting = (rotations.h1_accepted > 0) & (rotations.h0_accepted > 0) & (rotations.max_rotation_difference > 0)
    ours = (f"{int(acting.sum())} of {len(rotations)} runs: H1 made {int(rotations.h1_accepted.min())}-"
            f"{int(rotations.h1_accepted.max())} accepted rotation updates (of {int(rotations.h1_updates.max())}), and "
            f"max |R_H1 - R_H0| is {rotations.max_rotation_difference.min():.3g} to {rotations.max_rotation_difference.max():.3g}")
    return ("confirmed" if bool(acting.all()) else "refuted"), ours


def claim_results(auc: pd.DataFrame, leaves: pd.DataFrame, branches: pd.DataFrame, classes: pd.DataFrame,
                  rotations: pd.DataFrame, reference: Mapping[str, Any], *, profile: str, seeds: Mapping[str, list[int]],
                  accuracy_tolerance: float = 1.0) -> list[ClaimResult]:
    """The claims table of notebook 01 (see the module docstring); `seeds[network]` lists its seeds."""
    claims = {c["id"]: c for c in reference["claims"]}
    tests = claim_tests(auc, leaves, branches, classes, accuracy_tolerance=accuracy_tolerance)
    judged = judge_tests(tests)
    by_claim = {cid: [j for j in judged if j.test.claim_id == cid] for cid in CLAIM_IDS}
    replicated = replicated_networks(auc)
    networks, tested = list(replicated), [n for n, r in replicated.items() if r]
    single = [descriptive(auc, leaves, n) for n in networks if not replicated[n]]
    reduced = "" if profile == "paper" else f"REDUCED RUN ({profile}); "
    family = f"; Holm over the notebook's {len(tests)} tests"
    seed_text = ", ".join(f"{n}: seeds {s}" for n, s in seeds.items())
    t1, t1_ours = _t1(rotations)
    verdicts = {cid: {**network_verdicts(judged, cid), **{n: ONE_RUN for n in networks if not replicated[n]}}
                for cid in ("T2", "T3", "T4", "T5")}
    per_network = {n: conjunction([verdicts[c][n] for c in verdicts]) if replicated[n] else ONE_RUN for n in networks}
    holds = {c: [n for n in tested if verdicts[c][n] == "confirmed"] for c in verdicts}
    if len(tested) < 2:
        t6, t6_ours = ONE_RUN, (f"{len(tested)} of {len(networks)} networks have two or more seeds; the claim needs "
                                "two or more settings tested over runs")
    else:
        t6 = combine(list(per_network.values()))
        t6_ours = "; ".join(f"{c} confirmed on {len(holds[c])} of {len(tested)} networks" for c in holds) + \
            " | per network (T2-T5 together): " + ", ".join(f"{n}: {v}" for n, v in per_network.items())
    notes = {
        "T2": "per network: H1 axis AUC above the BN network's best unit (chosen on train crops, scored on val crops) "
              "and H1 - flat CW above -0.02 [I]; both needed",
        "T3": "(a) internal nodes' AUC (positives: crops of any descendant) H1 > flat CW; (b) within- minus across-branch "
              "Q of the concept axes larger with H1 than with flat CW (contrast, not H1 alone) [I]; all needed. In expectation "
              "H1 is flat CW with the parent rows weighted 1 + lambda_h x children: where run, (a) must also beat that "
              "weight-matched control (H0w)",
        "T4": "mean off-diagonal normalised similarity Q of the concept axes [I]: H1 < BN (its best units), and "
              "H1 - flat CW below +0.02 [I]; both needed",
        "T5": f"no loss: H1 - BN (same fine-tuning budget) above -{accuracy_tolerance} point [I]",
    }
    unit = ("seeds (training runs; each the mean over its nodes, leaves or classes, which are pseudo-replicates "
            f"within a run), per network; one-run networks not testable ({', '.join(networks)})")
    rows = {"T1": (t1, t1_ours, "exact check of the update count and of R_H1 != R_H0, no statistical test: the "
                   "hierarchical term acts during training; outside the Holm family", f"runs, n={len(rotations)}")}
    for cid in ("T2", "T3", "T4", "T5"):
        ours = "; ".join(part for part in (_ours(by_claim[cid]), *single) if part)
        rows[cid] = (combine(list(verdicts[cid].values())), ours, notes[cid] + family, unit)
    rows["T6"] = (t6, t6_ours, "T2-T5 on each network (ResNet-18 from scratch and ImageNet-trained EfficientNet-Lite0, "
                  "both on ConceptWorld: two networks, one dataset [I])", f"networks tested over seeds, n={len(tested)}")
    return [ClaimResult(claim_id=cid, claim=claims[cid]["claim"], paper=claims[cid]["paper"], ours=ours, verdict=v,
                        note=reduced + note, unit=unit, seeds=seed_text)
            for cid, (v, ours, note, unit) in rows.items()]

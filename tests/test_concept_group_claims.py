"""CGL's claims G1-G8 (`claim_results`) on hand-made tables with known verdicts, one case per branch.

Each table starts from clear effects in the paper's direction (every claim confirmed) and changes
one measure: the treatment minus control difference per seed is set, per network where needed, so
that the claims kit's rule (95% interval of the paired per-seed difference, Holm over the notebook's
tests, `combine` over networks), G3's tolerance bound, the accuracy gate (a network below 90% carries
no claim) and G8's purity comparison each land on a known verdict.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from replication.methods.concept_groups import VARIANTS, claim_results
from replication.reporting.claims import ClaimResult, load_reference

SEEDS = (0, 1, 2)
ARCHS = ("alexnet", "vgg16")
REFERENCE = load_reference("03_concept_group_learning")
# measure: (claim, table, treatment variant, control value at seed 0); the control is compared with weight decay
MEASURES = {
    "unique_sum": ("G1", "models", "cgl", 10.0),
    "rud": ("G2", "models", "cgl", 0.10),
    "top1": ("G3", "models", "cgl", 92.0),
    "mask_iou_gap": ("G5", "groups", "cgl", 0.05),
    "top_group_share": ("G6", "groups", "block_norm", 0.2),
    "top_area": ("G7", "groups", "cgl", 0.04),
}
# the manipulation checks and collapse diagnostics shown in the notes (never judged)
SHOWN = {"within_group_distance": 0.5, "spatial_spread": 0.4, "psi_variance": 0.01, "weight_corr_within": 0.1}
# treatment - control in the paper's direction, the same at every seed (G3: a 0.5-point drop)
CONFIRMING = {"unique_sum": 4.0, "rud": 0.05, "top1": -0.5, "mask_iou_gap": 0.05, "top_group_share": 0.1,
              "top_area": -0.01}
N_TESTS = 15  # G1, G2, G3, G5, G6, G7, G8 on two networks, and G4


def per_seed(difference) -> list[float]:
    """One difference per seed: a number repeats, a sequence is taken as given."""
    return [difference] * len(SEEDS) if np.isscalar(difference) else list(difference)


def per_arch(difference, arch: str):
    return difference[arch] if isinstance(difference, dict) else difference


def tables(differences: dict | None = None, *, synthetic=3.0, purity=0.3, archs=ARCHS,
           synthetic_accuracy=99.0) -> dict[str, pd.DataFrame]:
    """The five tables `claim_results` reads. `differences`: treatment - control of a measure (a number,
    one per seed, or {arch: either}); `synthetic`: CGL - weight decay of conv2's unique detectors;
    `purity`: the top group's purity minus the others' (NaN: no group with two detectors); `archs`: the
    networks; `synthetic_accuracy`: every synthetic model's val top-1 (%)."""
    differences = {**CONFIRMING, **(differences or {})}
    rows = {"models": [], "groups": []}
    for arch in archs:
        for seed in SEEDS:
            by_table = {"models": {v: {"arch": arch, "variant": v, "seed": seed} for v in VARIANTS},
                        "groups": {v: {"arch": arch, "variant": v, "seed": seed} for v in VARIANTS}}
            for measure, (_, table, treatment, base) in MEASURES.items():
                control = base + seed if measure == "top1" else base * (1 + seed / 10)
                difference = per_seed(per_arch(differences[measure], arch))[seed]
                for variant, row in by_table[table].items():
                    row[measure] = control + difference if variant == treatment else control
            for variant, row in by_table["groups"].items():
                row.update({measure: value * (0.5 if variant == "cgl" else 1.0) for measure, value in SHOWN.items()})
            for table in rows:
                rows[table].extend(by_table[table].values())
    synthetic_rows = [{"variant": variant, "seed": seed, "layer": "conv2",
                       "total": 8.0 + seed + (per_seed(synthetic)[seed] if variant == "cgl" else 0.0)}
                      for seed in SEEDS for variant in VARIANTS]
    synthetic_runs = [{"variant": variant, "seed": seed, "val_acc": synthetic_accuracy} for seed in SEEDS for variant in VARIANTS]
    purity_rows = [{"arch": arch, "variant": "cgl", "seed": seed, "layer": layer, "group": group,
                    "beta": 2.0 if group == 2 else 1.0,
                    "purity": 0.5 + seed / 10 + (per_seed(per_arch(purity, arch))[seed] if group == 2 else 0.0)}
                   for arch in archs for seed in SEEDS for layer in ("c1", "c2") for group in range(5)]
    return {"synthetic": pd.DataFrame(synthetic_rows), "synthetic_runs": pd.DataFrame(synthetic_runs),
            "models": pd.DataFrame(rows["models"]), "groups": pd.DataFrame(rows["groups"]),
            "purity": pd.DataFrame(purity_rows)}


def judged(differences: dict | None = None, *, profile: str = "ci", min_accuracy: float = 90.0, tolerance: float = 1.5,
           **table_options) -> dict[str, ClaimResult]:
    frames = tables(differences, **table_options)
    results = claim_results(REFERENCE, frames["synthetic"], frames["synthetic_runs"], frames["models"], frames["groups"],
                            frames["purity"], profile=profile, min_accuracy=min_accuracy, tolerance=tolerance)
    return {result.claim_id: result for result in results}


def verdicts(differences: dict | None = None, **options) -> dict[str, str]:
    return {cid: result.verdict for cid, result in judged(differences, **options).items()}


def test_every_claim_confirmed_on_clear_effects():
    results = judged()
    assert list(results) == [f"G{i}" for i in range(1, 9)]
    assert {cid: r.verdict for cid, r in results.items()} == {f"G{i}": "confirmed" for i in range(1, 9)}
    assert all(r.note.startswith("REDUCED ConceptWorld run (ci)") and r.claim and r.paper for r in results.values())
    assert all(f"Holm over the notebook's {N_TESTS} tests" in r.note for r in results.values())
    assert results["G1"].unit == "training seeds, n=3 per network" and results["G4"].unit == "training seeds, n=3"
    assert results["G1"].seeds == "0, 1, 2"
    assert results["G1"].ours == ("alexnet: 15.0 vs 11.0 (+36%), diff 4.0 [4.0, 4.0] 95% CI, SD 0.0, n=3 seeds, "
                                  "p(Holm) 0 -> confirmed; vgg16: 15.0 vs 11.0 (+36%), diff 4.0 [4.0, 4.0] 95% CI, "
                                  "SD 0.0, n=3 seeds, p(Holm) 0 -> confirmed")
    assert results["G4"].ours.startswith("synthetic: 12.0 vs 9.0 of 15 (+33%), diff 3.0 [3.0, 3.0] 95% CI")
    assert "val top-1 (mean over seeds): synthetic weight_decay 99.0%" in results["G4"].note
    assert "val top-1 (mean over seeds): alexnet weight_decay 93.0%" in results["G1"].note  # 92 + seed
    assert not any(r.note.startswith("REDUCED") for r in judged(profile="paper").values())


def test_trained_losses_and_collapse_diagnostics_are_shown_not_judged():
    results = judged()
    assert "manipulation check (the trained L_g, not evidence), CGL vs weight decay: alexnet 0.250 vs 0.500" in results["G5"].note
    assert "collapse diagnostics, CGL vs weight decay: psi_variance alexnet 0.005 vs 0.010" in results["G5"].note
    assert "manipulation check (the trained L_s, not evidence)" in results["G7"].note
    assert results["G7"].ours.startswith("alexnet: 0.034 vs 0.044 (-23%)")  # top_area 0.04 x (1 + seed / 10); CGL 0.01 less


DIRECTIONAL = [measure for measure in MEASURES if measure != "top1"]  # G1, G2, G5, G6, G7: paired differences


@pytest.mark.parametrize("measure", DIRECTIONAL)
@pytest.mark.parametrize("case, expected", [
    ("opposite", "refuted"),  # every network's interval on the other side
    ("noise", "inconclusive"),  # differences +d, -d, 0: the interval holds 0
    ("split", "mixed"),  # one network confirms, the other refutes
    ("one_network_noise", "partly confirmed"),  # one network confirms, the other is inconclusive
    ("one_network_opposite_noise", "partly refuted"),
])
def test_paired_claims_each_branch(measure, case, expected):
    d = CONFIRMING[measure]
    difference = {"opposite": -d, "noise": (d, -d, 0.0), "split": {"alexnet": d, "vgg16": -d},
                  "one_network_noise": {"alexnet": d, "vgg16": (d, -d, 0.0)},
                  "one_network_opposite_noise": {"alexnet": -d, "vgg16": (d, -d, 0.0)}}[case]
    got = judged({measure: difference})
    claim = MEASURES[measure][0]
    assert got[claim].verdict == expected
    assert all(r.verdict == "confirmed" for cid, r in got.items() if cid != claim)  # only this claim moved
    if case == "noise":  # an inconclusive effect carries its minimal detectable effect
        assert got[claim].ours.count("MDE") == 2


def test_a_network_below_the_accuracy_bar_carries_no_claim():
    """vgg16's CGL variant at 85%: every claim on it is not testable, alexnet's stand; G3 still judges vgg16's
    drop (its baseline learned the task)."""
    got = judged({"top1": {"alexnet": -0.5, "vgg16": -9.0}})
    for cid in ("G1", "G2", "G5", "G6", "G7", "G8"):
        assert got[cid].verdict == "confirmed"  # alexnet alone
        assert "vgg16: not testable here (val top-1 below 90%: cgl" in got[cid].ours
    assert got["G3"].verdict == "mixed"
    low = judged(min_accuracy=99.0)  # nothing reaches the bar
    assert {cid: r.verdict for cid, r in low.items()} == {f"G{i}": "not testable here" for i in range(1, 9) if i != 4} | {
        "G4": "confirmed"}
    assert judged(synthetic_accuracy=80.0)["G4"].verdict == "not testable here"


def test_holm_makes_effects_that_pass_alone_inconclusive_in_a_family_of_weak_ones():
    """Per-seed differences d x (1, 1.2, 1.4) give p = 0.009 alone; 15 such tests under Holm reject none."""
    weak = {measure: tuple(d * f for f in (1.0, 1.2, 1.4)) for measure, d in CONFIRMING.items() if measure != "top1"}
    weak_purity = tuple(0.3 * f for f in (1.0, 1.2, 1.4))
    weak_synthetic = tuple(3.0 * f for f in (1.0, 1.2, 1.4))
    found = verdicts(weak, purity=weak_purity, synthetic=weak_synthetic, tolerance=10.0)
    assert found["G1"] == found["G4"] == found["G8"] == "inconclusive"
    alone = judged({"unique_sum": weak["unique_sum"]}, archs=("alexnet",))["G1"]
    assert alone.verdict == "confirmed"


@pytest.mark.parametrize("drops, min_accuracy, tolerance, expected", [
    (3.0, 90.0, 1.5, "refuted"),  # every drop beyond the tolerance
    ({"alexnet": 0.5, "vgg16": 3.0}, 90.0, 1.5, "mixed"),  # one network within, one beyond
    ((0.0, 2.0, 4.6), 90.0, 1.5, "inconclusive"),  # mean 2.2 above 1.5, the interval holds 1.5
    ({"alexnet": 0.5, "vgg16": (0.0, 2.0, 4.6)}, 90.0, 1.5, "partly confirmed"),
    (0.5, 90.0, 0.5, "inconclusive"),  # a drop equal to the tolerance is not below it
    (0.5, 90.0, 0.4, "refuted"),
    (0.5, 99.0, 1.5, "not testable here"),  # baselines (92-94%) below the bar: not learned
    (3.0, 99.0, 1.5, "not testable here"),  # ... whatever the drop
])
def test_accuracy_cost_g3_each_branch(drops, min_accuracy, tolerance, expected):
    negated = {arch: -np.asarray(per_seed(d)) for arch, d in drops.items()} if isinstance(drops, dict) else \
        -np.asarray(per_seed(drops))
    result = judged({"top1": negated}, min_accuracy=min_accuracy, tolerance=tolerance)["G3"]
    assert result.verdict == expected
    assert f"below {tolerance} points" in result.note and f"baseline below {min_accuracy:.0f}%" in result.note
    if expected == "not testable here":
        assert result.ours.count("not testable here (weight-decay top-1") == 2


@pytest.mark.parametrize("synthetic, expected", [
    (-3.0, "refuted"),
    ((1.0, -1.0, 0.0), "inconclusive"),
    (0.1, "confirmed"),  # small but the same at every seed
])
def test_synthetic_g4_each_branch(synthetic, expected):
    assert judged(synthetic=synthetic)["G4"].verdict == expected


@pytest.mark.parametrize("purity, expected", [
    (-0.3, "refuted"),  # the most relevant group is the least pure
    ((0.2, -0.2, 0.0), "inconclusive"),
    ({"alexnet": 0.3, "vgg16": -0.3}, "mixed"),
])
def test_purity_g8_each_branch(purity, expected):
    assert verdicts(purity=purity)["G8"] == expected


def test_purity_g8_without_pure_groups_is_not_testable():
    result = judged(purity=math.nan)["G8"]
    assert result.verdict == "not testable here"
    assert result.ours == ("alexnet: not testable here (no layer where the top group and another had >= 2 detectors); "
                           "vgg16: not testable here (no layer where the top group and another had >= 2 detectors)")
    assert result.unit == "training seeds with such a layer: none"


def test_one_seed_gives_no_interval_and_stays_inconclusive():
    frames = tables()
    one = {name: frame[frame.seed == 0] for name, frame in frames.items()}
    results = claim_results(REFERENCE, one["synthetic"], one["synthetic_runs"], one["models"], one["groups"],
                            one["purity"], profile="ci")
    assert {r.verdict for r in results} == {"inconclusive"}
    assert "n=1 seeds: no interval" in results[0].ours


def test_g5_to_g7_also_judge_the_synthetic_cnn_and_g6_skips_batch_norm():
    """The `groups` table holds the synthetic CNN (gated by its own accuracy) and a BN network, on which
    beta is scale-free: G6 is not testable there, whatever its numbers."""
    frames = tables(archs=("alexnet_bn", "two_layer_cnn"))
    models = frames["models"][(frames["models"].arch == "alexnet_bn") & (frames["models"].variant != "block_norm")]
    groups = frames["groups"]  # AlexNet-B without its R_bn-only variant (`main_variants`)
    frames["groups"] = groups[(groups.arch != "alexnet_bn") | (groups.variant != "block_norm")]
    results = {r.claim_id: r for r in claim_results(REFERENCE, frames["synthetic"], frames["synthetic_runs"], models,
                                                   frames["groups"], frames["purity"], profile="ci")}
    assert results["G6"].verdict == "confirmed"  # on the synthetic CNN alone
    assert "alexnet_bn: not testable here (BN after every conv" in results["G6"].ours
    assert results["G5"].ours.count("-> confirmed") == 2
    low = frames["synthetic_runs"].assign(val_acc=80.0)
    results = {r.claim_id: r for r in claim_results(REFERENCE, frames["synthetic"], low, models, frames["groups"],
                                                   frames["purity"], profile="ci")}
    assert "two_layer_cnn: not testable here (val top-1 below 90%" in results["G5"].ours
    assert results["G6"].verdict == "not testable here"

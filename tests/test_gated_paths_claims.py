"""NAD's claims N1-N7 (`gated_paths.claim_results`): every verdict branch of every claim, reached with
hand-built `ArchitectureResult`s of four classes whose per-class numbers sit clearly on one side of
each rule (or straddle it), judged by the claims kit (95% intervals over classes, one Holm family)."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from replication.methods import gated_paths as gp
from replication.reporting.claims import ClaimResult

CLAIM_IDS = ["N1", "N2", "N3", "N4", "N5", "N6", "N7"]
CLASSES = (0, 1, 2, 3)
JITTER = np.array([0.0, 0.02, -0.02, 0.01])  # per-class spread, so that every test has a real interval
RISING = (0.4, 0.6, 0.8, 0.9)
REFERENCE = {"claims": [{"id": cid, "claim": f"claim {cid}", "paper": "unknown"} for cid in CLAIM_IDS]}


def per_class(value) -> np.ndarray:
    """A number becomes that number plus the jitter; a sequence is one value per class."""
    return value + JITTER if np.isscalar(value) else np.asarray(value, dtype=float)


def hits_frame(curve, offset=0.0) -> pd.DataFrame:
    """Hits as `hit_rates` returns them: one row per (class, layer), the class's hit rate `curve[layer]` + jitter."""
    return pd.DataFrame([{"class_id": c, "layer": layer, "hit": rate + offset + JITTER[i]}
                         for i, c in enumerate(CLASSES) for layer, rate in enumerate(curve)])


def network(*, family: str = "plain", arch: str | None = None, accuracy_drop=0.0, units_kept=0.25, false_positives_added=(0, 0.004, -0.004, 0.002), hits=RISING,
            control=(0.25,) * 4, ranks=(0.9, 1.0, 0.8, 0.95), rank_classes=CLASSES) -> gp.ArchitectureResult:
    """One network's result (its arch named after its family unless given); the defaults pass N1, N4 and
    N7 and show no dip (N5)."""
    accuracy = pd.DataFrame({"class_id": CLASSES, "original_accuracy": 1.0,
                             "path_accuracy": 1.0 - per_class(accuracy_drop), "units_kept": per_class(units_kept),
                             "original_false_positive": 0.02,
                             "path_false_positive": 0.02 + per_class(false_positives_added)})
    wrong = pd.DataFrame({"true": list(rank_classes), "predicted": 0, "rank": list(ranks)})
    return gp.ArchitectureResult(arch=arch or family, family=family, paths=None, accuracy=accuracy, hits=hits_frame(hits),
                                 control_hits=hits_frame(control), hit_summary=None, control_summary=None,
                                 similarity=None, empty_layers=0, misclassification=wrong)


def concepts(own=0.5, random=0.2) -> pd.DataFrame:
    return pd.DataFrame({"class_id": CLASSES, "own_concepts_found": per_class(own),
                         "own_concepts_found_random": random, "own_concepts_found_all_units": 1.0})


def judged(*networks: gp.ArchitectureResult, concept_tables=None, profile="ci", **rules) -> dict[str, ClaimResult]:
    results = {f"net{i}": result for i, result in enumerate(networks)}
    tables = {f"net{i}": table for i, table in enumerate(concept_tables)} if concept_tables else None
    rows = gp.claim_results(results, tables, REFERENCE, profile=profile, search_seed=3, **rules)
    assert [row.claim_id for row in rows] == CLAIM_IDS
    return {row.claim_id: row for row in rows}


def verdicts(*networks, **options) -> dict[str, str]:
    return {cid: row.verdict for cid, row in judged(*networks, **options).items()}


def test_table_rows_carry_reference_unit_seed_and_the_reduced_note():
    rows = judged(network(), network(family="residual"))
    assert rows["N1"].claim == "claim N1" and rows["N1"].paper == "unknown"
    assert rows["N1"].unit == "classes: net0 n=4, net1 n=4" and rows["N1"].seeds == "networks net0, net1; search seed 3"
    assert rows["N1"].note.startswith("REDUCED RUN (ci); per class") and "Holm over the notebook's" in rows["N1"].note
    assert rows["N1"].ours.startswith("net0 accuracy drop: 0.003 [-0.025, 0.030] 95% CI, SD 0.017, n=4 classes")
    assert not judged(network(), profile="paper")["N1"].note.startswith("REDUCED")


@pytest.mark.parametrize("networks, expected", [
    ([network()], "confirmed"),
    ([network(accuracy_drop=0.3)], "refuted"),  # every class loses 30 points
    ([network(units_kept=0.7)], "refuted"),  # accuracy kept, but most units open
    ([network(false_positives_added=0.5)], "refuted"),  # accuracy kept by labelling everything as the class
    ([network(), network(accuracy_drop=0.3)], "mixed"),
    ([network(), network(accuracy_drop=(0.0, 0.3, -0.2, 0.1))], "partly confirmed"),  # the interval holds the bound
])
def test_n1_path_accuracy_and_size_per_network(networks, expected):
    assert verdicts(*networks, max_accuracy_drop=0.1, max_units_kept=0.5)["N1"] == expected


@pytest.mark.parametrize("tables, expected", [
    ([concepts()], "confirmed"),
    ([concepts(own=0.0)], "refuted"),  # fewer own concepts than random unit sets
    ([concepts(own=(0.5, 0.0, 0.1, 0.2))], "inconclusive"),
])
def test_n2_own_concepts_on_paths_against_same_size_random_units(tables, expected):
    assert verdicts(network(), concept_tables=tables)["N2"] == expected


def test_n2_without_concept_labels_is_not_testable():
    assert verdicts(network())["N2"] == "not testable here"
    no_detector = concepts().assign(own_concepts_found_all_units=0.0)
    row = judged(network(), concept_tables=[no_detector])["N2"]
    assert row.verdict == "not testable here" and "no unit of the network detects" in row.ours


def test_n3_needs_all_four_connection_types():
    row = judged(network(), network(family="residual"), network(family="dense"))["N3"]
    assert row.verdict == "not testable here" and row.ours == (
        "not testable here (no nas network here that learned the task; the claim is about all four connection types)")
    four = [network(family=f) for f in gp.CONNECTION_TYPES]
    assert verdicts(*four)["N3"] == "confirmed"
    four[3] = network(family="nas", accuracy_drop=0.3)
    assert verdicts(*four)["N3"] == "mixed"


@pytest.mark.parametrize("networks, expected", [
    ([network()], "confirmed"),
    ([network(hits=(0.25, 0.25, 0.25, 0.25))], "inconclusive"),  # at chance and at the control
    ([network(hits=(0.1,) * 4, control=(0.5,) * 4)], "refuted"),
    ([network(control=(0.9,) * 4)], "refuted"),  # above chance, but below another class's path
    ([network(), network(hits=(0.25,) * 4)], "partly confirmed"),
])
def test_n4_deep_hit_rate_above_chance_and_control(networks, expected):
    assert verdicts(*networks)["N4"] == expected


@pytest.mark.parametrize("hits, expected", [
    ((0.4, 0.9, 0.5, 0.95), "confirmed"),  # 0.9 -> 0.5 in every class
    ((0.4, 0.6, 0.8, 0.9), "refuted"),  # even the pair that rises least (0.8 -> 0.9) rises in every class
])
def test_n5_largest_dip_corrected_for_the_pairs_searched(hits, expected):
    row = judged(network(hits=hits))["N5"]
    assert row.verdict == expected and "of 6 pairs" in row.ours and "CI (best of 6)" in row.ours


def test_n5_a_dip_that_passes_alone_is_inconclusive_after_the_search():
    # per-class drops 0.05 + (0, 0.04, -0.04, 0.02): p = 0.045 alone, 6 x 0.045 > 0.05 after the search
    drops = pd.DataFrame({0: 0.8 + np.array([0.0, 0.04, -0.04, 0.02]), 1: 0.75}, index=CLASSES)
    dip = gp.largest_dip(drops)
    assert (dip["from_layer"], dip["to_layer"], dip["searched"]) == (0, 1, 1)
    wide = pd.DataFrame({0: 0.2, 1: 0.8 + np.array([0.0, 0.04, -0.04, 0.02]), 2: 0.75, 3: 0.9}, index=CLASSES)
    hits = wide.stack().rename("hit").rename_axis(["class_id", "layer"]).reset_index()
    result = network()
    result.hits = hits
    assert judged(result)["N5"].verdict == "inconclusive"


def test_n6_needs_a_between_seed_null():
    row = judged(network(), network(family="residual"))["N6"]
    assert row.verdict == "not testable here" and "plain 1, residual 1" in row.ours
    # two archs of one type are not networks trained alike: no null from them
    row = judged(network(arch="alexnet"), network(arch="vgg"), network(family="residual"))["N6"]
    assert row.verdict == "not testable here" and "alexnet 1, vgg 1, residual 1" in row.ours
    same = [network(), network(hits=(0.41, 0.61, 0.79, 0.9)), network(family="residual", hits=(0.8, 0.3, 0.5, 0.4)),
            network(family="residual", hits=(0.79, 0.31, 0.5, 0.41))]
    assert verdicts(*same)["N6"] == "confirmed"  # types differ far more than networks of one type
    alike = [network(), network(hits=(0.8, 0.3, 0.5, 0.4)), network(family="residual", hits=(0.41, 0.59, 0.8, 0.9)),
             network(family="residual", hits=(0.79, 0.31, 0.5, 0.41))]
    assert verdicts(*alike)["N6"] == "refuted"  # types differ less than networks of one type
    # another arch of the same type (far from both plain networks) leaves the between-seed null as it was
    null = re.compile(r"between seeds (\d\.\d+)")
    with_vgg = judged(*same, network(arch="vgg", hits=(0.9, 0.1, 0.9, 0.1)))["N6"].ours
    assert null.search(with_vgg)[1] == null.search(judged(*same)["N6"].ours)[1]


def test_n6_distances_split_the_null_by_arch_and_leave_out_networks_below_the_bar():
    shifted = lambda offset: tuple(rate + offset for rate in RISING)  # noqa: E731  (a constant gap between curves)
    results = {"a0": network(), "a1": network(hits=shifted(0.1)), "r0": network(family="residual", hits=shifted(0.5)),
               "r1": network(family="residual", hits=shifted(0.7)), "untrained": network(arch="plain", hits=shifted(3.0))}
    results["untrained"].accuracy["original_accuracy"] = 0.5
    table = gp.n6_distances(results).set_index("comparison")
    assert table.index.tolist() == ["between seeds of plain", "between seeds of residual", "between connection types"]
    np.testing.assert_allclose(table["mean_distance"], [0.1, 0.2, (0.5 + 0.7 + 0.4 + 0.6) / 4])
    assert table["network_pairs"].tolist() == [1, 1, 4] and (table["classes"] == 4).all()
    np.testing.assert_allclose(table["sd_over_classes"], 0.0, atol=1e-12)
    results["a0"].accuracy["original_accuracy"] = 0.5  # one plain network left: no null, and no pair at all
    assert gp.n6_distances({"a0": results["a0"]}).columns.tolist() == table.reset_index().columns.tolist()


@pytest.mark.parametrize("networks, expected", [
    ([network(), network(ranks=(1.0, 0.9, 1.0, 0.85))], "confirmed"),
    ([network(ranks=(0.1, 0.0, 0.2, 0.05))], "refuted"),
    ([network(), network(ranks=(0.1, 0.0, 0.2, 0.05))], "mixed"),
    ([network(ranks=(0.4, 0.6, 0.5, 0.55))], "inconclusive"),  # at chance
    ([network(ranks=(0.9, 1.0, 0.8, 0.95), rank_classes=(1, 1, 1, 1))], "inconclusive"),  # one true class: no interval
])
def test_n7_misclassified_images_rank_their_prediction_high(networks, expected):
    assert verdicts(*networks)["N7"] == expected


def test_n7_is_clustered_by_true_class_and_needs_misclassifications():
    clustered = judged(network(ranks=(0.9, 1.0, 0.8, 0.6), rank_classes=(0, 0, 1, 1)))["N7"]
    assert "0.825" in clustered.ours and "n=2 true classes" in clustered.ours  # class means 0.95 and 0.70
    none = judged(network(ranks=(), rank_classes=()))["N7"]
    assert none.verdict == "not testable here" and "no misclassified val image" in none.ours


def test_a_network_below_the_accuracy_bar_is_not_judged():
    weak = network(family="residual")
    weak.accuracy = weak.accuracy.assign(original_accuracy=0.5)
    rows = judged(weak)
    assert all(rows[cid].verdict == "not testable here" for cid in ("N1", "N4", "N5", "N7"))
    assert "val accuracy 0.500 below the 0.9 bar" in rows["N1"].ours
    assert judged(network(), weak)["N1"].verdict == "confirmed"  # judged on the learned network alone
    assert rows["N3"].ours == "not testable here (no network reached the 0.9 val accuracy bar)"
    assert rows["N6"].ours.startswith("not testable here (networks per arch: none;")
    four = [network(family=f) for f in ("plain", "dense", "nas")] + [weak]
    assert "no residual network here that learned the task" in judged(*four)["N3"].ours

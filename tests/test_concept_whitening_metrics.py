"""Notebook 01's metrics and claims on hand-made activations with known answers."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from replication.methods.concept_whitening.alignment import ConceptSets, ConceptTree
from replication.methods.concept_whitening.claims import claim_results, claim_tests, leaf_rows
from replication.methods.concept_whitening.metrics import (axis_labels, roc_auc, best_units, branch_similarity,
                                                           concept_importance, purity_auc, similarity_matrix,
                                                           similarity_summary, top_images)
from replication.reporting.claims import judge_tests, load_reference

TREE = ConceptTree(("warm", "cold", "red", "yellow", "blue"), (None, None, "warm", "warm", "cold"))


def crops(per_leaf=20):
    leaf = torch.arange(3).repeat_interleave(per_leaf)
    members = {n: torch.cat([torch.nonzero(leaf == TREE.leaves.index(l)).flatten() for l in TREE.leaves_under(n)])
               for n in TREE.nodes}
    return ConceptSets(TREE, torch.zeros(len(leaf), 3, 4, 4), leaf, members)


def test_purity_auc_scores_each_node_on_its_axis_with_subtree_positives():
    sets = crops()
    scores = torch.zeros(len(sets.leaf), 5, dtype=torch.float64)
    scores[:, 0] = (sets.leaf < 2).double()  # warm axis: red and yellow high
    scores[:, 2] = (sets.leaf == 0).double()  # red axis perfect
    scores[:, 3] = (sets.leaf == 0).double()  # yellow axis fires on red instead: AUC 0.25
    table = purity_auc(scores, sets, TREE, axes=range(5), folds=4, seed=0).set_index("node")
    assert table.loc["warm", "auc"] == 1.0 and table.loc["red", "auc"] == 1.0
    assert table.loc["yellow", "auc"] == pytest.approx(0.25, abs=0.03)  # 0.5 x the share of blue among negatives, per fold
    assert table.loc["blue", "auc"] == 0.5 and table.loc["cold", "auc"] == 0.5  # constant axes
    assert (table.folds == 4).all() and table.loc["warm", "depth"] == 0


def test_best_units_pick_the_separating_unit():
    sets = crops()
    scores = torch.randn(len(sets.leaf), 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores[:, 4] = (sets.leaf == 2).double() * 5  # blue (and cold) on unit 4
    chosen = best_units(scores, sets, TREE)
    assert chosen[TREE.axis("blue")] == 4 and chosen[TREE.axis("cold")] == 4


def test_similarity_matrix_and_branch_summary():
    sets = crops(per_leaf=5)
    directions = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0, 0, 1.0]], dtype=torch.float64)  # red, yellow, blue
    features = directions[sets.leaf] * torch.arange(1, 16, dtype=torch.float64)[:, None]  # scale does not matter
    q = similarity_matrix(features, sets, TREE)
    assert q.index.tolist() == ["red", "yellow", "blue"]
    np.testing.assert_allclose(q.to_numpy(), [[1, 0.6, 0], [0.6, 1, 0], [0, 0, 1]], atol=1e-12)
    branches = branch_similarity(q, TREE).set_index("leaf")
    assert branches.loc["red", "within"] == pytest.approx(0.6) and branches.loc["red", "across"] == pytest.approx(0.0)
    assert np.isnan(branches.loc["blue", "within"])  # a branch of one leaf has no within pairs
    summary = similarity_summary(q, TREE)
    assert summary["inter_intra"] == pytest.approx(1.2 / 6)


def test_top_images_and_axis_labels():
    scores = torch.tensor([[0.0, 3.0], [2.0, 1.0], [1.0, 2.0]])
    tree = ConceptTree(("a", "b"), (None, None))
    top = top_images(scores, tree, k=2)
    assert top[top.node == "b"].image.tolist() == [0, 2]
    units = pd.DataFrame({"unit": [0, 1, 2, 3, 4], "label": ["red", "blue", "red", "x", "yellow"],
                          "iou": [0.1, 0.2, 0.3, 0.0, 0.05]})
    labels = axis_labels(units, [0, 1, 2, 3, 4], TREE).set_index("node")
    assert labels.matches.tolist() == [True, True, True, False, False]  # warm <- red, cold <- blue, red <- red


class TwoAxes(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[4.0, 0.0], [-4.0, 0.0]]))  # only channel 0 matters

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_concept_importance_is_one_for_an_unused_axis_and_above_for_the_used_one():
    images = torch.zeros(40, 2, 2, 2)
    labels = torch.arange(40) % 2
    images[:, 0] = (1 - 2 * labels.float())[:, None, None]  # channel 0 decides the class
    images[:, 1] = torch.randn(40, 2, 2)
    tree = ConceptTree(("used", "unused"), (None, None))
    table = concept_importance(TwoAxes(), "features", images, labels, [0, 1], tree, batch_size=16,
                               permutations=3).set_index("node")
    assert table.loc["unused", "importance"] == pytest.approx(1.0) and table.loc["unused", "importance_sd"] == pytest.approx(0.0)
    assert table.loc["used", "importance"] > 5 and table.loc["used", "importance_sd"] > 0  # permutations differ
    single = concept_importance(TwoAxes(), "features", images, labels, [0, 1], tree, batch_size=16)
    assert np.isnan(single.importance_sd).all()


def synthetic_study(h1_gain=0.1, seeds=(0, 1, 2, 3), gap_gain=None, matched_gain=None):
    """Long tables as run_study writes them, with H1 better than flat CW and BN by `h1_gain` and its
    within- minus across-branch Q gap (flat CW's: 0.1) larger than flat CW's by `gap_gain` (default `h1_gain`); each seed
    gets its own small offset (runs differ), nodes, leaves and classes their own noise (a leaf's
    across-branch Q the same in every variant of a seed). `matched_gain`: also a weight-matched flat CW
    run, that much above BN."""
    rng = np.random.default_rng(0)
    gap_gain = h1_gain if gap_gain is None else gap_gain
    aucs, classes, runs, similarity, branches = [], [], [], {}, []
    for network in ("net_a", "net_b"):
        for seed in seeds:
            run_noise, across = 0.003 * rng.standard_normal(), 0.5 + 0.01 * rng.standard_normal(3)
            variants = [("bn", 0.0, 0.0), ("flat", 0.5 * h1_gain, 0.1), ("ancestor", h1_gain, 0.1 + gap_gain)]
            variants += [] if matched_gain is None else [("matched", matched_gain, 0.1)]
            for variant, shift, gap in variants:
                base = {"network": network, "seed": seed, "variant": variant, "cw_layers": 1, "placement": "main", "layer": "l"}
                name = f"{network}_{seed}_{variant}"
                runs.append({"name": name, **base})
                aucs += [{"node": n, "depth": TREE.depth(n), "auc": 0.6 + shift + run_noise + 0.01 * rng.standard_normal(),
                          **base} for n in TREE.nodes]
                classes += [{"class_id": c, "accuracy": 95 + rng.standard_normal() * 0.1, **base} for c in range(6)]
                q = np.full((3, 3), 0.8 - 3 * shift + run_noise) + 0.01 * rng.random((3, 3))
                np.fill_diagonal(q, 1)
                similarity[name] = pd.DataFrame(q, index=TREE.leaves, columns=TREE.leaves)
                branches += [{"leaf": l, "within": 0.5 + gap + run_noise, "across": a, **base}
                             for l, a in zip(TREE.leaves, across)]
    return pd.DataFrame(aucs), pd.DataFrame(classes), pd.DataFrame(runs), similarity, pd.DataFrame(branches)


ROTATIONS = pd.DataFrame({"network": ["net_a"], "seed": [0], "max_rotation_difference": [0.3], "h1_updates": [4],
                          "h1_accepted": [4], "h0_updates": [4], "h0_accepted": [4]})


def verdicts(auc, classes, runs, similarity, branches, rotations=ROTATIONS):
    leaves = leaf_rows(similarity, runs)
    seeds = {n: sorted(auc[auc.network == n].seed.unique().tolist()) for n in auc.network.unique()}
    reference = load_reference("01_hierarchical_concept_whitening")
    return {r.claim_id: r for r in claim_results(auc, leaves, branches, classes, rotations, reference, profile="ci",
                                                 seeds=seeds)}


def test_claims_confirm_a_clear_hierarchical_gain_and_refuse_missing_variants():
    auc, classes, runs, similarity, branches = synthetic_study()
    leaves = leaf_rows(similarity, runs)
    tests = claim_tests(auc, leaves, branches, classes)
    assert {t.claim_id for t in tests} == {"T2", "T3", "T4", "T5"} and len(tests) == 2 * 7
    assert {t.effect.unit for t in tests} == {"seeds"} and {t.effect.n for t in tests} == {4}  # runs, not nodes
    rows = verdicts(auc, classes, runs, similarity, branches)
    assert rows["T1"].verdict == "confirmed" and rows["T2"].verdict == "confirmed"
    assert rows["T3"].verdict == "confirmed" and rows["T4"].verdict == "confirmed"
    assert rows["T6"].verdict in ("confirmed", "inconclusive")
    assert rows["T2"].note.startswith("REDUCED RUN (ci)") and rows["T2"].unit.startswith("seeds")
    worse, *_ = synthetic_study(h1_gain=-0.1)
    worse_rows = {t.claim_id + t.condition: t.effect for t in claim_tests(worse, leaves, branches, classes)}
    assert worse_rows["T2AUC H1 - BN best filter"].mean < 0
    with pytest.raises(ValueError, match="variant 'flat'"):
        claim_tests(auc[auc.variant != "flat"], leaves, branches, classes)


def test_t3_needs_a_larger_branch_gap_than_flat_cw_and_t4_can_fail_against_flat_cw():
    # H1 has a within > across gap, but flat CW the same one: the contrast is not confirmed
    auc, classes, runs, similarity, branches = synthetic_study(gap_gain=0.0)
    h1 = branches[branches.variant == "ancestor"]
    assert (h1.within - h1.across).mean() > 0.09  # what "H1 within > across" alone would have confirmed
    judged = {(j.test.network, j.test.condition): j.verdict
              for j in judge_tests(claim_tests(auc, leaf_rows(similarity, runs), branches, classes))}
    assert judged["net_a", "(within - across-branch Q) H1 - flat CW"] == "inconclusive"
    assert verdicts(auc, classes, runs, similarity, branches)["T3"].verdict != "confirmed"
    # H1's Q of the axes well above flat CW's: the bound "H1 - flat below +0.02" is refuted
    auc, classes, runs, similarity, branches = synthetic_study()
    for name in [n for n in similarity if n.endswith("_ancestor")]:
        q = similarity[name].to_numpy().copy()
        q[~np.eye(3, dtype=bool)] += 0.5
        similarity[name] = pd.DataFrame(q, index=TREE.leaves, columns=TREE.leaves)
    tests = claim_tests(auc, leaf_rows(similarity, runs), branches, classes)
    judged = {(j.test.network, j.test.condition): j.verdict for j in judge_tests(tests)}
    assert judged["net_a", "Q H1 - flat CW below +0.02"] == "refuted"
    assert verdicts(auc, classes, runs, similarity, branches)["T4"].verdict == "refuted"


def test_t3_needs_h1_above_the_weight_matched_control_where_it_was_run():
    assert verdicts(*synthetic_study(matched_gain=0.05))["T3"].verdict == "confirmed"  # H1 0.1 above BN, H0w 0.05
    auc, classes, runs, similarity, branches = synthetic_study(matched_gain=0.1)
    tests = claim_tests(auc, leaf_rows(similarity, runs), branches, classes)
    assert "parent-axis AUC H1 - weight-matched flat CW" in {t.condition for t in tests}
    assert verdicts(auc, classes, runs, similarity, branches)["T3"].verdict != "confirmed"  # H1 no better than H0w


def test_one_run_per_network_is_not_testable_and_nodes_are_only_described():
    auc, classes, runs, similarity, branches = synthetic_study(seeds=(0,))
    assert claim_tests(auc, leaf_rows(similarity, runs), branches, classes) == []
    rows = verdicts(auc, classes, runs, similarity, branches)
    for cid in ("T2", "T3", "T4", "T5", "T6"):
        assert rows[cid].verdict == "not testable here", cid
    assert "descriptive" in rows["T2"].ours and "(n=5)" in rows["T2"].ours  # 5 nodes described, not tested


def test_t1_is_refuted_when_no_update_was_accepted():
    stalled = ROTATIONS.assign(h1_accepted=[0])
    assert verdicts(*synthetic_study(), rotations=stalled)["T1"].verdict == "refuted"


def test_similarity_over_all_channels_ignores_the_rotation_but_not_over_the_axes():
    """Q over every channel is rotation invariant (why notebook 01 uses the concept axes only)."""
    sets = crops(per_leaf=6)
    g = torch.Generator().manual_seed(2)
    features = torch.randn(len(sets.leaf), 8, generator=g, dtype=torch.float64) + 2 * torch.eye(8, dtype=torch.float64)[sets.leaf]
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    rotated = features @ rotation.T
    np.testing.assert_allclose(similarity_matrix(rotated, sets, TREE).to_numpy(),
                               similarity_matrix(features, sets, TREE).to_numpy(), atol=1e-12)
    on_axes = similarity_matrix(rotated[:, :5], sets, TREE).to_numpy() - similarity_matrix(features[:, :5], sets, TREE).to_numpy()
    assert np.abs(on_axes).max() > 0.05


def test_roc_auc_by_hand():
    positive = np.array([True, True, False, False, False])
    # pairs (positive, negative): 0.9 beats all three, 0.4 beats 0.1 and ties 0.4 -> (3 + 1.5) / 6
    assert roc_auc(positive, np.array([0.9, 0.4, 0.4, 0.1, 0.5])) == pytest.approx(4.5 / 6)
    assert roc_auc(positive, np.array([1.0, 0.9, 0.1, 0.2, 0.3])) == 1.0
    with pytest.raises(ValueError, match="positives and negatives"):
        roc_auc(np.array([True, True]), np.array([0.1, 0.2]))

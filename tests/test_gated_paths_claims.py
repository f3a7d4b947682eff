"""NAD's claim rules N1-N7 (`gated_paths.claim_rows`): every verdict branch of every claim, reached with
hand-built `ArchitectureResult`s whose numbers sit on the known side of each rule's threshold."""
import pandas as pd
import pytest
import torch

from replication.methods import gated_paths as gp

CLAIM_IDS = ["N1", "N2", "N3", "N4", "N5", "N6", "N7"]


def hit_summary(hit_rates, hit_std: float = 0.0, n_mosaics: int = 100) -> pd.DataFrame:
    """A per-layer hit-rate summary as `summarize_hit_rates` returns it (depth l / (L - 1))."""
    layers = len(hit_rates)
    return pd.DataFrame({"layer": range(layers), "hit_rate": hit_rates, "hit_std": hit_std, "n_mosaics": n_mosaics,
                         "depth": [layer / (layers - 1) for layer in range(layers)]})


def similarity_matrix(s01: float, s02: float, s12: float) -> torch.Tensor:
    """The (3, 3) path similarity of three classes with the given off-diagonal values."""
    return torch.tensor([[1.0, s01, s02], [s01, 1.0, s12], [s02, s12, 1.0]])


def network(*, accuracy_drop: float = 0.0, units_kept: float = 0.25, similarity=(0.4, 0.4, 0.4),
            hits=(0.4, 0.6, 0.8, 0.9), hit_std: float = 0.0, control=(0.25, 0.25, 0.25, 0.25),
            ranks=(0.9, 1.0, 0.8)) -> gp.ArchitectureResult:
    """One network's result; the defaults pass N1, N4 and N7 and show no dip (N5)."""
    accuracy = pd.DataFrame({"original_accuracy": [1.0, 1.0], "path_accuracy": [1.0 - accuracy_drop] * 2,
                             "units_kept": [units_kept] * 2})
    return gp.ArchitectureResult(arch="net", family="plain", paths=None, accuracy=accuracy, hits=None,
                                 hit_summary=hit_summary(hits, hit_std), control_summary=hit_summary(control),
                                 similarity=similarity_matrix(*similarity), empty_layers=0,
                                 misclassification=pd.DataFrame({"rank": list(ranks)}))


def verdicts(*networks: gp.ArchitectureResult, **rule_options) -> dict[str, str]:
    rows = gp.claim_rows({f"net{i}": result for i, result in enumerate(networks)}, **rule_options)
    assert [row["claim_id"] for row in rows] == CLAIM_IDS
    return {row["claim_id"]: row["verdict"] for row in rows}


@pytest.mark.parametrize("networks, expected", [
    ([network()], "confirmed"),
    ([network(accuracy_drop=0.25)], "confirmed"),  # a drop equal to the bound still passes (<=)
    ([network(accuracy_drop=0.5), network(units_kept=0.5)], "refuted"),  # too large a drop; half the units kept
    ([network(), network(accuracy_drop=0.5)], "not confirmed"),
])
def test_n1_and_n3_path_accuracy_and_size_per_network(networks, expected):
    found = verdicts(*networks, max_accuracy_drop=0.25, max_units_kept=0.5)
    assert found["N1"] == found["N3"] == expected


@pytest.mark.parametrize("uniform, expected", [(0.9, "confirmed"), (0.1, "inconclusive")])
def test_n2_diversity_spread_against_twice_the_jackknife_se(uniform, expected):
    # similarity (0.2, 0.4, 0.6): diversity 0.6; leave-one-out diversities 0.4, 0.6, 0.8 -> jackknife
    # SE sqrt(2/3 * 0.08) = 0.231, so the bound is 0.462. Uniform 0.9: diversity 0.1, spread 0.5 > 0.462;
    # uniform 0.1: diversity 0.9, spread 0.3 < 0.462.
    assert gp.path_diversity_se(similarity_matrix(0.2, 0.4, 0.6)) == pytest.approx((2 / 3 * 0.08) ** 0.5)
    found = verdicts(network(similarity=(0.2, 0.4, 0.6)), network(similarity=(uniform,) * 3))
    assert found["N2"] == expected


def test_n2_is_inconclusive_when_networks_are_equally_diverse():
    assert verdicts(network(), network())["N2"] == "inconclusive"


# Deep hit rate 0.3 with std 0.5 over 100 mosaics: SE sqrt(3 * 0.05^2) / 3 = 0.029, and 0.3 - 0.25 < 2 SE.
NEAR_CHANCE = dict(hits=(0.3, 0.3, 0.3, 0.3), hit_std=0.5)


@pytest.mark.parametrize("networks, expected", [
    ([network()], "confirmed"),
    ([network(hits=(0.3, 0.3, 0.3, 0.3))], "confirmed"),  # 0.05 above chance, no spread: more than 2 SE
    ([network(**NEAR_CHANCE), network(control=(0.9, 0.9, 0.9, 0.95))], "refuted"),  # within 2 SE; below the control
    ([network(), network(**NEAR_CHANCE)], "not confirmed"),
])
def test_n4_deep_hit_rate_above_chance_and_control(networks, expected):
    assert verdicts(*networks)["N4"] == expected


@pytest.mark.parametrize("hits, hit_std, expected", [
    ((0.4, 0.9, 0.5, 0.95), 0.0, "confirmed"),  # 0.9 -> 0.5 with no spread
    ((0.4, 0.9, 0.85, 0.95), 0.5, "not confirmed"),  # drop 0.05 < sqrt(2) * 0.05
    ((0.4, 0.6, 0.8, 0.9), 0.0, "not confirmed"),  # never falls
])
def test_n5_some_network_has_a_significant_dip(hits, hit_std, expected):
    assert verdicts(network(), network(hits=hits, hit_std=hit_std))["N5"] == expected


@pytest.mark.parametrize("networks, expected", [
    ([network(), network(hits=(0.3, 0.5, 0.7, 0.8))], "confirmed"),  # curves 0.1 apart, no spread
    ([network(hit_std=1.0), network(hits=(0.3, 0.5, 0.7, 0.8), hit_std=1.0)], "not confirmed"),  # 2 SE = 0.2
    ([network(), network()], "not confirmed"),
    ([network()], "not confirmed"),  # no pair of networks
])
def test_n6_some_pair_of_curves_differs_by_more_than_twice_the_se(networks, expected):
    assert verdicts(*networks)["N6"] == expected


@pytest.mark.parametrize("networks, expected", [
    ([network(), network(ranks=(1.0, 0.9, 1.0))], "confirmed"),
    ([network(ranks=(0.1, 0.0, 0.2))], "refuted"),
    ([network(), network(ranks=(0.1, 0.0, 0.2))], "not confirmed"),
    ([network(), network(ranks=(0.4, 0.6))], "inconclusive"),  # mean rank at chance
    ([network(), network(ranks=(0.9,))], "inconclusive"),  # too few misclassified images for an SE
])
def test_n7_misclassified_images_rank_their_prediction_high(networks, expected):
    assert verdicts(*networks)["N7"] == expected

"""The claims kit: intervals, tests, power, Holm's family-wise rule and the combination of networks."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.power import TTestPower

from replication.reporting.claims import (
    ClaimTest, Effect, bound_effect, cluster_means, combine, conjunction, family_key, judge, judge_tests, mean_spread,
    minimal_detectable_effect, network_verdicts, paired_effect,
)

T_975_DF2 = 4.302653  # Student's t, 97.5% quantile, 2 degrees of freedom (printed tables, 7 digits)


def effect(p_value: float, mean: float = 1.0, direction: str = "higher", bound: float = 0.0) -> Effect:
    return Effect(mean, mean - 1, mean + 1, 1.0, 5, "seeds", bound, direction, p_value, 0.5)


def test_interval_and_test_of_three_seeds_by_hand():
    e = bound_effect([1.0, 2.0, 3.0], unit="seeds")
    half_width = T_975_DF2 * 1.0 / math.sqrt(3)
    assert (e.mean, e.sd, e.n) == (2.0, 1.0, 3)
    assert e.ci_low == pytest.approx(2 - half_width, abs=1e-6) and e.ci_high == pytest.approx(2 + half_width, abs=1e-6)
    t = 2.0 / (1.0 / math.sqrt(3))
    assert e.p_value == pytest.approx(2 * (1 - stats.t.cdf(t, df=2)), rel=1e-12)


def test_minimal_detectable_effect_has_80_percent_power():
    """Checked against the noncentral t directly: a true effect of size `mde` is detected 80% of the time."""
    values = [0.3, -0.1, 0.4, 0.0, 0.2]
    e = bound_effect(values, unit="seeds")
    n, df = len(values), len(values) - 1
    critical = stats.t.ppf(0.975, df)
    shift = e.mde / e.sd * math.sqrt(n)
    power = stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift)
    assert power == pytest.approx(0.8, abs=1e-6)


def test_paired_effect_tests_the_differences_against_a_margin():
    e = paired_effect([5, 6, 8], [1, 2, 3], unit="seeds", margin=1.0)
    assert e.mean == pytest.approx(13 / 3) and e.bound == 1.0
    assert e.p_value == pytest.approx(stats.ttest_1samp([4, 4, 5], 1.0).pvalue)
    with pytest.raises(ValueError, match="paired values per seeds"):
        paired_effect([1, 2], [1, 2, 3], unit="seeds")


def test_one_unit_or_identical_units_give_no_interval():
    single = bound_effect([3.0], unit="seeds")
    assert single.n == 1 and math.isnan(single.p_value) and math.isnan(single.mde)
    assert judge([single]) == ["inconclusive"]
    assert "no interval" in single.describe()
    same = bound_effect([2.0, 2.0], unit="classes", bound=1.0)
    assert (same.ci_low, same.ci_high, same.p_value) == (2.0, 2.0, 0.0)
    assert judge([same]) == ["confirmed"]


def test_holm_adjusts_within_the_family():
    # Holm: 0.01 * 3 = 0.03 rejects; 0.03 * 2 = 0.06 does not, so neither does 0.04
    assert judge([effect(0.01), effect(0.04), effect(0.03)]) == ["confirmed", "inconclusive", "inconclusive"]
    assert judge([effect(0.04)]) == ["confirmed"]  # alone it would pass


def test_the_side_of_a_rejected_test_decides_confirmed_or_refuted():
    assert judge([effect(0.001, mean=-2.0)]) == ["refuted"]
    assert judge([effect(0.001, mean=1.0, direction="lower", bound=1.5)]) == ["confirmed"]  # e.g. drop below a tolerance
    assert judge([effect(0.001, mean=2.0, direction="lower", bound=1.5)]) == ["refuted"]
    assert judge([effect(0.2)]) == ["inconclusive"]


@pytest.mark.parametrize("verdicts, combined", [
    (["confirmed", "confirmed"], "confirmed"),
    (["refuted", "refuted", "refuted"], "refuted"),
    (["confirmed", "inconclusive"], "partly confirmed"),
    (["inconclusive", "refuted"], "partly refuted"),
    (["confirmed", "refuted", "inconclusive"], "mixed"),
    (["inconclusive", "inconclusive"], "inconclusive"),
    (["not testable here", "confirmed"], "confirmed"),
    (["not testable here"], "not testable here"),
])
def test_combining_networks(verdicts, combined):
    assert combine(verdicts) == combined


def test_combine_refuses_combined_words():
    with pytest.raises(ValueError, match="per-network verdicts"):
        combine(["mixed", "confirmed"])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="direction must be one of"):
        bound_effect([1, 2], unit="seeds", direction="up")
    with pytest.raises(ValueError, match="one finite value per seeds"):
        bound_effect([1, float("nan")], unit="seeds")
    with pytest.raises(ValueError, match="spread must be"):
        mean_spread([1, 2], "sd")


def test_cluster_means_and_labelled_spreads():
    assert cluster_means([1, 3, 10, 2], ["a", "a", "b", "b"]).tolist() == [2.0, 6.0]
    assert mean_spread([1.0, 2.0, 3.0], "SD") == "2.00 ± 1.00 SD (n=3)"
    assert mean_spread([1.0, 2.0, 3.0], "SE") == f"2.00 ± {1 / math.sqrt(3):.2f} SE (n=3)"
    assert mean_spread([4.0]) == "4.00 (n=1)"
    assert np.isclose(bound_effect([1.0, 2.0, 3.0], unit="seeds").sd, 1.0)


def test_float_rounding_is_not_a_spread():
    """Differences equal up to float rounding (0.1 + 0.2 - 0.3 and friends) are identical units."""
    e = bound_effect([0.30000000000000004, 0.3, 0.29999999999999993], unit="seeds")
    assert (e.sd, e.p_value, e.ci_low, e.ci_high) == (0.0, 0.0, e.mean, e.mean)


def test_an_effect_chosen_from_several_candidates_is_corrected_for_the_search():
    values = [1.0, 1.2, 1.4]
    alone, best_of_4 = bound_effect(values, unit="classes"), bound_effect(values, unit="classes", searched=4)
    assert best_of_4.p_value == pytest.approx(4 * alone.p_value)
    low, high = stats.t.interval(1 - 0.05 / 4, df=2, loc=1.2, scale=0.2 / math.sqrt(3))
    assert (best_of_4.ci_low, best_of_4.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert best_of_4.mde > alone.mde
    assert "98.75% CI (best of 4)" in best_of_4.describe()
    assert bound_effect([0.0, 5.0, 10.0], unit="classes", searched=100).p_value == 1.0  # capped
    with pytest.raises(ValueError, match="searched = 0"):
        bound_effect(values, unit="classes", searched=0)


@pytest.mark.parametrize("verdicts, expected", [
    (["confirmed", "confirmed"], "confirmed"),
    (["confirmed", "inconclusive"], "inconclusive"),
    (["confirmed", "refuted"], "refuted"),
    (["inconclusive", "refuted"], "refuted"),
])
def test_conjunction_of_conditions_on_one_network(verdicts, expected):
    assert conjunction(verdicts) == expected


def test_judged_tests_share_one_holm_family_and_are_worded_per_network():
    tests = [ClaimTest("N1", "vgg", effect(0.01), "accuracy"), ClaimTest("N1", "vgg", effect(0.03), "units"),
             ClaimTest("N1", "resnet", effect(0.04), "accuracy"), ClaimTest("N4", "vgg", effect(0.001, mean=-2.0))]
    judged = judge_tests(tests)
    assert [j.verdict for j in judged] == ["confirmed", "inconclusive", "inconclusive", "refuted"]
    assert [j.p_holm for j in judged] == pytest.approx([0.03, 0.06, 0.06, 0.004])
    assert network_verdicts(judged, "N1") == {"vgg": "inconclusive", "resnet": "inconclusive"}
    assert network_verdicts(judged, "N4") == {"vgg": "refuted"}
    # two of four rejected: a third rejection needs p <= 0.05 / 2, so the MDE is stated at that level
    mde = TTestPower().solve_power(nobs=5, alpha=0.025, power=0.8, alternative="two-sided") * 1.0
    assert judged[1].mde_level == pytest.approx(0.025) and judged[1].mde == pytest.approx(mde)
    assert judged[1].text() == (f"vgg units: 1.00 [0.00, 2.00] 95% CI, SD 1.00, n=5 seeds, p(Holm) 0.06, "
                                f"MDE {mde:.2f} at Holm's level 0.025 -> inconclusive")
    assert judged[1].mde > minimal_detectable_effect(5, 1.0, 0.05)  # stricter than the unadjusted level
    assert judged[3].text(1, "before ") == "vgg: before -2.0 [-3.0, -1.0] 95% CI, SD 1.0, n=5 seeds, p(Holm) 0.004 -> refuted"


def test_per_claim_families_apply_holm_within_each_claim():
    tests = [ClaimTest("N1", "vgg", effect(0.01), "accuracy"), ClaimTest("N1", "vgg", effect(0.03), "units"),
             ClaimTest("N1", "resnet", effect(0.04), "accuracy"), ClaimTest("N4", "vgg", effect(0.04, mean=-2.0))]
    judged = judge_tests(tests, family=family_key("claim"))
    # N1: Holm over its three tests (0.03, 0.06, 0.06); N4 alone keeps its p
    assert [j.p_holm for j in judged] == pytest.approx([0.03, 0.06, 0.06, 0.04])
    assert [j.verdict for j in judged] == ["confirmed", "inconclusive", "inconclusive", "refuted"]
    # within N1 one of three rejected: the next rejection needs 0.05 / 2
    assert judged[1].mde_level == pytest.approx(0.025)
    one_family = judge_tests(tests, family=family_key("notebook"))
    assert [j.p_holm for j in one_family] == [j.p_holm for j in judge_tests(tests)]
    assert one_family[3].verdict == "inconclusive"  # 0.04 x 4 tests in one family
    with pytest.raises(ValueError, match="holm_family 'paper'"):
        family_key("paper")

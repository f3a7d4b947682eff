"""Notebook 04's settings ([uibe] in every profile) and its claims P1, U1-U5 through the claims kit, on
hand-made tables with known outcomes."""
import numpy as np
import pandas as pd
import pytest

from replication.methods import interpretable_basis as ib
from replication.profiles import available_profiles, load_profile
from replication.reporting.claims import claims_table, load_reference

REFERENCE = load_reference("04_unsupervised_interpretable_basis")
BASES = ("natural", "random rotation", "UIBE", "IBD")
SEEDS = (0, 1, 2, 3, 4)


@pytest.mark.parametrize("name", available_profiles())
def test_every_profile_builds_uibe_settings_with_two_networks_and_the_spec_planted_test(name, paper_placeholders):
    settings = load_profile(name).build(ib.UIBESettings, "uibe")
    assert len(settings.networks) >= 2 and set(settings.networks) <= set(settings.layers)
    assert settings.planted.fit.directions == settings.planted.data.concepts == 3  # spec section 9: I = 3
    if name != "ci":
        assert settings.planted.fit.restarts >= 8 and len(settings.planted.seeds) >= 3 and len(settings.seeds) >= 3


def test_settings_refuse_bad_values_with_clear_messages():
    with pytest.raises(ValueError, match=r"layers names no layer for \['vgg16'\]"):
        ib.UIBESettings(networks=("vgg16",))
    with pytest.raises(ValueError, match="train_images = 1"):
        ib.UIBESettings(train_images=1)
    with pytest.raises(ValueError, match="directions_grid"):
        ib.UIBESettings(directions_grid=(0,))
    with pytest.raises(ValueError, match="every concept needs a direction"):
        ib.PlantedRun(fit=ib.UIBEConfig(directions=2))
    with pytest.raises(ValueError, match="at least one seed"):
        ib.PlantedRun(seeds=())


def test_run_planted_gives_one_row_per_seed_and_basis():
    run = ib.PlantedRun(seeds=(0, 1), n_train=60, n_test=30, fit=ib.UIBEConfig(directions=3, batch_size=30, epochs=2, restarts=2))
    table = ib.run_planted(run, device="cpu")
    assert table.groupby("seed").size().tolist() == [3, 3]
    assert (table.restarts == 2).all() and table.min_iou.between(0, 1).all()


def planted_table(uibe: list[float], reference: float = 0.6) -> pd.DataFrame:
    rows = []
    for seed, value in enumerate(uibe):
        rows += [{"seed": seed, "basis": "UIBE", "min_iou": value},
                 {"seed": seed, "basis": "natural basis (oracle thresholds)", "min_iou": reference},
                 {"seed": seed, "basis": "random rotation (oracle thresholds)", "min_iou": reference - 0.05 + 0.01 * seed}]
    return pd.DataFrame(rows)


def network_tables(networks=("net_a", "net_b"), *, uibe_s1=20.0, uibe_s2=5.0, null_share=0.2,
                   collapsed=()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """scores / one_hot long tables: UIBE far above the references on S¹, S² and one-hot share, with S¹
    above IBD and S² below it, and above UIBE on shuffled features (`null_share`); a small spread over seeds."""
    values = {"natural": (2.0, 1.5, 0.1), "random rotation": (1.5, 1.0, 0.1), "UIBE": (uibe_s1, uibe_s2, 0.7),
              "IBD": (10.0, 10.0, 0.3)}
    scores, one_hot = [], []
    for network in networks:
        for seed in SEEDS:
            jitter = 0.01 * (seed - 2)
            for basis, (s1, s2, share) in values.items():
                scores.append({"network": network, "seed": seed, "basis": basis, "s1": s1 + jitter, "s2": s2 - jitter})
                active = 0.9 if basis == "UIBE" and network in collapsed else 0.1
                one_hot.append({"network": network, "seed": seed, "basis": basis, "one_hot_share": share + jitter,
                                "active_share": active})
            one_hot.append({"network": network, "seed": seed, "basis": ib.SHUFFLED, "one_hot_share": null_share - jitter,
                            "active_share": 0.1})
    return pd.DataFrame(scores), pd.DataFrame(one_hot)


def reduction_table(equal=True) -> pd.DataFrame:
    return pd.DataFrame({"equal": [True, True, equal]})


def verdicts(**keywords) -> dict[str, str]:
    table = claims_table(ib.claim_results(*keywords.pop("tables"), REFERENCE, profile="ci", **keywords))
    return dict(zip(table.claim_id, table.verdict)), table


def test_clear_effects_are_confirmed_and_the_table_carries_paper_values_units_and_notes():
    scores, one_hot = network_tables()
    result, table = verdicts(tables=(planted_table([0.93, 0.95, 0.94, 0.96, 0.92]), scores, one_hot, reduction_table()))
    assert list(result) == ["P1", "U1", "U2", "U3", "U4", "U5"]
    assert result == {cid: "confirmed" for cid in result}
    row = table.set_index("claim_id")
    assert "60.93" in row.loc["U3", "paper"] and "53.32" in row.loc["U5", "paper"]
    assert row.loc["P1", "unit"] == "data seeds, n=5" and row.loc["U1", "unit"].startswith("basis seeds, n=5 per network")
    assert row.loc["U1", "note"].startswith("REDUCED RUN (ci); ") and "Holm" in row.loc["U3", "note"]
    assert "net_a S¹ vs natural" in row.loc["U3", "ours"] and "95% CI" in row.loc["U3", "ours"]
    assert "net_a one-hot share vs UIBE on shuffled features" in row.loc["U1", "ours"]
    assert "manipulation check" in row.loc["U1", "ours"] and "natural 0.100 ± 0.016 SD (n=5)" in row.loc["U1", "ours"]


def test_u1_is_judged_against_the_shuffled_features_null_not_against_the_untrained_bases():
    scores, one_hot = network_tables(null_share=0.7)  # the objective alone makes shuffled features as one-hot as real ones
    result, _ = verdicts(tables=(planted_table([0.93, 0.95, 0.94, 0.96, 0.92]), scores, one_hot, reduction_table()))
    assert result["U1"] != "confirmed" and result["U2"] != "confirmed"


def test_wrong_side_effects_are_refuted():
    scores, one_hot = network_tables(uibe_s1=1.0, uibe_s2=12.0)  # UIBE below the references on S¹, above IBD on S²
    result, _ = verdicts(tables=(planted_table([0.70, 0.72, 0.71, 0.69, 0.73], reference=0.8), scores, one_hot,
                                 reduction_table(equal=False)))
    assert result["P1"] == "refuted" and result["U3"] == "refuted" and result["U5"] == "refuted"
    assert result["U4"] == "refuted" and result["U1"] == "confirmed" and result["U2"] == "refuted"


def test_a_collapsed_uibe_fit_leaves_u3_and_u5_untestable_on_that_network():
    scores, one_hot = network_tables(collapsed=("net_b",))
    result, table = verdicts(tables=(planted_table([0.93, 0.95, 0.94, 0.96, 0.92]), scores, one_hot, reduction_table()))
    row = table.set_index("claim_id")
    assert "net_b: not testable here (UIBE collapsed: 0.90 of its directions active" in row.loc["U3", "ours"]
    assert result["U3"] == result["U5"] == "confirmed"  # net_a alone: `combine` leaves untestable networks out
    assert "net_b: not testable here" in row.loc["U2", "ours"] and result["U2"] == "confirmed"


def test_u2_needs_two_networks():
    scores, one_hot = network_tables(networks=("net_a",))
    result, table = verdicts(tables=(planted_table([0.93, 0.95, 0.94]), scores, one_hot, reduction_table()))
    assert result["U2"] == "not testable here" and "one network/data pair" in table.set_index("claim_id").loc["U2", "ours"]


def test_missing_bases_are_named():
    scores, one_hot = network_tables()
    with pytest.raises(ValueError, match="no 's1' for basis 'IBD' on network 'net_a'"):
        ib.claim_tests(planted_table([0.9, 0.9]), scores[scores.basis != "IBD"], one_hot)


def test_the_reference_file_names_its_sources_and_every_claim():
    assert [c["id"] for c in REFERENCE["claims"]] == ["P1", "U1", "U2", "U3", "U4", "U5"]
    assert all(c["source"] for c in REFERENCE["claims"]) and REFERENCE["source"]
    assert np.isclose(REFERENCE["reference_numbers"]["uibe_resnet18_places365"]["s1"], 60.93)

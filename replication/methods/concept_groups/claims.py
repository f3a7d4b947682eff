"""The claims G1-G8 judged on the experiment's tables: `claim_results` gives the paper | ours | verdict rows.

Through the claims kit (`reporting.claims`): the unit of replication is the training seed; each
claim is one paired per-seed difference per network (CGL or R_bn against weight decay, the same
seed), G3 the per-seed top-1 drop against a tolerance, G4 one paired difference on the synthetic
task, G8 the per-seed purity of the most relevant group against the other groups. The notebook's
tests form one Holm family; several networks are combined with `combine`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from replication.methods.concept_groups.groups import GROUPS
from replication.methods.concept_groups.metrics import purity_pairs
from replication.reporting.claims import (ClaimResult, ClaimTest, Judged, bound_effect, combine, judge_tests,
                                          paired_effect)

UNIT = "seeds"
SYNTHETIC = "synthetic"  # the network label of G4's tests
# claim -> (table, measure, treatment variant, the paper's side of treatment - weight decay, digits)
PAIRED_CLAIMS = {
    "G1": ("models", "unique_sum", "cgl", "higher", 1),
    "G2": ("models", "rud", "cgl", "higher", 3),
    "G6": ("groups", "top_group_share", "block_norm", "higher", 3),
}
# Claims whose only measure here is a loss CGL trains: judging them by it would be circular, so they are
# "not testable here"; the measure is shown as a manipulation check (does the regulariser act?).
# claim -> (measure of the `groups` table, the loss it equals, digits)
TRAINED_MEASURES = {
    "G5": ("within_group_distance", "L_g, the group activation loss", 3),
    "G7": ("spatial_spread", "L_s, the spatial loss", 3),
}


def _relative(new: float, old: float) -> str:
    return f"{100 * (new - old) / old:+.0f}%" if old else "n/a"


def _paired(frame: pd.DataFrame, value: str, treatment: str, control: str = "weight_decay") -> tuple[np.ndarray, np.ndarray]:
    """Treatment and control values of the seeds that have both."""
    wide = frame.pivot_table(index="seed", columns="variant", values=value).dropna(subset=[treatment, control])
    return wide[treatment].to_numpy(dtype=float), wide[control].to_numpy(dtype=float)


def _by_model(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """A reference table's rows keyed by (data, model), then by regulariser."""
    table: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        table.setdefault((row["data"], row["model"]), {})[row["regulariser"]] = row
    return table


def claim_tests(synthetic: pd.DataFrame, models: pd.DataFrame, groups: pd.DataFrame, purity: pd.DataFrame, *,
                chance: float, tolerance: float) -> tuple[list[ClaimTest], dict[str, dict[str, str]]]:
    """Every test of G1-G8 (one per claim and network), and the networks a claim cannot be tested on,
    with the reason (`{claim: {network: reason}}`): G3 on a network whose weight-decay baseline stays
    below twice `chance` (it has not learned the task), G8 on a network without a layer where the top
    group and another group both hold two detectors, G5 and G7 everywhere (`TRAINED_MEASURES`)."""
    tests = []
    untestable = {"G3": {}, "G8": {}, **{claim: {"": f"the only measure here is {loss}, which CGL trains directly: a "
                                               "semantic measure of the activation regions is still missing"}
                                     for claim, (_, loss, _) in TRAINED_MEASURES.items()}}
    tables = {"models": models, "groups": groups}
    for claim, (table, measure, treatment, direction, _) in PAIRED_CLAIMS.items():
        for arch, rows in tables[table].groupby("arch", sort=False):
            t, c = _paired(rows, measure, treatment)
            tests.append(ClaimTest(claim, arch, paired_effect(t, c, unit=UNIT, direction=direction)))
    for arch, rows in models.groupby("arch", sort=False):
        t, c = _paired(rows, "top1", "cgl")
        if c.mean() < 2 * chance:
            untestable["G3"][arch] = f"weight-decay top-1 {c.mean():.1f}% < twice chance ({2 * chance:.0f}%)"
            continue
        tests.append(ClaimTest("G3", arch, bound_effect(c - t, unit=UNIT, bound=tolerance, direction="lower")))
    t, c = _paired(synthetic[synthetic.layer == "conv2"], "total", "cgl")
    tests.append(ClaimTest("G4", SYNTHETIC, paired_effect(t, c, unit=UNIT, direction="higher")))
    for arch, rows in purity_pairs(purity).groupby("arch", sort=False):
        rows = rows.dropna(subset=["top", "others"])
        if not len(rows):
            untestable["G8"][arch] = "no layer where the top group and another had >= 2 detectors"
            continue
        tests.append(ClaimTest("G8", arch, paired_effect(rows.top, rows.others, unit=UNIT, direction="higher")))
    return tests, untestable


def _ours(judged: list[Judged], untestable: dict[str, str], means: dict[str, str], digits: int) -> str:
    """Per network: the means compared, then the judged effect (or why it is not testable)."""
    parts = [j.text(digits, means.get(j.test.network, "")) for j in judged]
    parts += [f"{network}: not testable here ({reason})" if network else f"not testable here ({reason})"
              for network, reason in untestable.items()]
    return "; ".join(parts)


def _verdict(judged: list[Judged], untestable: dict[str, str]) -> str:
    return combine([j.verdict for j in judged] + ["not testable here"] * len(untestable))


def claim_results(reference: dict, synthetic: pd.DataFrame, models: pd.DataFrame, groups: pd.DataFrame,
                  purity: pd.DataFrame, *, profile: str, chance: float, tolerance: float = 1.5) -> list[ClaimResult]:
    """The claims table rows (G1-G8): paper | ours | verdict, judged by the claims kit.

    The tables are `run_synthetic`'s (`synthetic`), `run_main`'s (`models`, `purity`) and
    `run_group_statistics`'s (`groups`); `reference` is the paper's numbers. `chance`: top-1 (%) of
    guessing; a baseline below twice that has not learned the task, so G3 is not testable on it.
    `tolerance`: the largest top-1 drop (points) G3 accepts (its bound).
    """
    claims = {c["id"]: c for c in reference["claims"]}
    reduced = "" if profile == "paper" else f"REDUCED ConceptWorld run ({profile}), not numerically comparable; "
    tests, untestable = claim_tests(synthetic, models, groups, purity, chance=chance, tolerance=tolerance)
    judged = judge_tests(tests)
    family = (f"; Holm over the notebook's {len(tests)} tests, unit: training seed, paired by seed; "
              "networks combined by `combine`")
    n_models = models.groupby(["arch", "variant"]).size().min()
    n_synthetic = synthetic.groupby(["variant", "layer"]).size().min()
    seeds = ", ".join(str(s) for s in sorted(models["seed"].unique()))
    synthetic_seeds = ", ".join(str(s) for s in sorted(synthetic["seed"].unique()))
    t2 = [(k, v["cgl"]["sum"], v["weight_decay"]["sum"])
          for k, v in _by_model(reference["table2_unique_detectors"]["rows"]).items() if "cgl" in v and "weight_decay" in v]
    t3 = _by_model(reference["table3_accuracy_rud"]["rows"])
    t1 = {(r["regulariser"], r["layer"]): r["total"] for r in reference["table1_synthetic"]["rows"]}

    def means(table: pd.DataFrame, measure: str, treatment: str, digits: int, what: str = "diff") -> dict[str, str]:
        """Per network: 'treatment mean vs control mean (relative change), <what> ' before its effect."""
        out = {}
        for arch, rows in table.groupby("arch", sort=False):
            t, c = _paired(rows, measure, treatment)
            out[arch] = f"{t.mean():.{digits}f} vs {c.mean():.{digits}f} ({_relative(t.mean(), c.mean())}), {what} "
        return out

    def result(cid: str, note: str, mean_text: dict[str, str], unit: str, digits: int = 3,
               seed_list: str = seeds) -> ClaimResult:
        mine = [j for j in judged if j.test.claim_id == cid]
        blocked = untestable.get(cid, {})
        return ClaimResult(claim_id=cid, claim=claims[cid]["claim"], paper=claims[cid]["paper"],
                           ours=_ours(mine, blocked, mean_text, digits), verdict=_verdict(mine, blocked),
                           note=reduced + note + family, unit=unit, seeds=seed_list)

    per_network = f"training seeds, n={n_models} per network"
    tables = {"models": models, "groups": groups}
    mean_texts = {cid: means(tables[table], measure, treatment, digits)
                  for cid, (table, measure, treatment, _, digits) in PAIRED_CLAIMS.items()}
    paper = "; ".join(f"{m}-{d}: {c} vs {w} ({_relative(c, w)})" for (d, m), c, w in t2)
    results = [result("G1", f"paper pairs {paper}; unique detectors summed over the dissected layers",
                      mean_texts["G1"], per_network, digits=1)]
    paper = "; ".join(f"{m}-{d}: {v['cgl']['rud']:.3f} vs {v['weight_decay']['rud']:.3f} "
                      f"({_relative(v['cgl']['rud'], v['weight_decay']['rud'])})" for (d, m), v in t3.items())
    results.append(result("G2", f"paper {paper}; RUD of the last two dissected layers", mean_texts["G2"], per_network))
    paper = "; ".join(f"{m}-{d}: drop {v['weight_decay']['top1'] - v['cgl']['top1']:.2f}" for (d, m), v in t3.items())
    results.append(result("G3", f"paper top-1 {paper} points; confirmed when the drop's interval lies below "
                          f"{tolerance} points; not testable on a network whose baseline is below twice chance "
                          f"({chance:.0f}%)", means(models, "top1", "cgl", 1, "drop (points)"), per_network,
                          digits=2))
    paper_c, paper_w = t1[("cgl", "conv2")], t1[("weight_decay", "conv2")]
    t, c = _paired(synthetic[synthetic.layer == "conv2"], "total", "cgl")
    results.append(result("G4", f"paper {paper_c} vs {paper_w} of 15 ({_relative(paper_c, paper_w)}); conv2 unique "
                          "detectors", {SYNTHETIC: f"{t.mean():.1f} vs {c.mean():.1f} of 15 "
                                                   f"({_relative(t.mean(), c.mean())}), diff "},
                          f"training seeds, n={n_synthetic}", digits=1, seed_list=synthetic_seeds))
    checks = {claim: "manipulation check, CGL vs weight decay: " + "; ".join(
                  f"{arch} {text.removesuffix(', diff ')}" for arch, text in means(groups, measure, "cgl", digits).items())
              for claim, (measure, _, digits) in TRAINED_MEASURES.items()}
    results.append(result("G5", f"{checks['G5']}; mean within-group soft-IoU distance of psi on val images", {},
                          per_network))
    results.append(result("G6", f"top group's share of beta_l (1/G = {1 / GROUPS:.2f} when uniform), R_bn vs weight decay",
                          mean_texts["G6"], per_network))
    results.append(result("G7", f"{checks['G7']}; mean L_s of psi with coordinates in [0, 1]; see the group-map figures",
                          {}, per_network))
    pairs = purity_pairs(purity).dropna(subset=["top", "others"])
    purity_means = {arch: f"{rows.top.mean():.2f} vs {rows.others.mean():.2f} ({int(rows.layers.sum())} layers), diff "
                    for arch, rows in pairs.groupby("arch", sort=False)}
    purity_unit = "training seeds with such a layer: " + (
        ", ".join(f"{arch} n={n}" for arch, n in pairs.groupby("arch", sort=False).size().items()) or "none")
    results.append(result("G8", "CGL models: detector purity (share of a group's detectors with its most common label) "
                          "of each dissected layer's most relevant group (largest beta) vs its other groups, averaged "
                          "over the layers where both hold >= 2 detectors; the alignment threshold T is unknown [U], "
                          "the dissection IoU threshold stands in [I]", purity_means, purity_unit, digits=2))
    return results

"""The claims G1-G8 judged on the experiment's tables: `claim_results` gives the paper | ours | verdict rows.

Through the claims kit (`reporting.claims`): the unit of replication is the training seed; each
claim is one paired per-seed difference per network (CGL or R_bn against weight decay, the same
seed), G3 the per-seed top-1 drop against a tolerance, G4 one paired difference on the synthetic
task, G8 the per-seed purity of the most relevant group against the other groups. G5 and G7 are
judged by measures no CGL loss trains (thresholded-mask IoU within vs across groups; the above-T_k
area of the top images); the trained losses L_g and L_s are shown as manipulation checks only. A
network one of whose variants has not learned its task (mean val top-1 below `min_accuracy`) carries
no claim: "not testable here". The notebook's tests form one Holm family; several networks are
combined with `combine`.
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
SYNTHETIC_ARCH = "two_layer_cnn"  # the synthetic CNN's rows in the `groups` table (G5-G7)
# G6 reads beta_gl = ||w_gl|| as a group's relevance: behind a batch-norm the network does not depend on
# a filter's scale, so beta measures no relevance there and the block norm cannot make groups matter less
SCALE_FREE = "BN after every conv: the function does not depend on beta_gl, which measures no relevance"
# claim -> (table, measure, treatment variant, the paper's side of treatment - weight decay, digits)
PAIRED_CLAIMS = {
    "G1": ("models", "unique_sum", "cgl", "higher", 1),
    "G2": ("models", "rud", "cgl", "higher", 3),
    "G5": ("groups", "mask_iou_gap", "cgl", "higher", 3),
    "G6": ("groups", "top_group_share", "block_norm", "higher", 3),
    "G7": ("groups", "top_area", "cgl", "lower", 3),
}
# The losses CGL trains, shown next to G5 and G7 as manipulation checks (does the regulariser act?), never
# as evidence: claim -> (measure of the `groups` table, the loss it equals, digits)
TRAINED_MEASURES = {
    "G5": ("within_group_distance", "L_g", 3),
    "G7": ("spatial_spread", "L_s", 3),
}
COLLAPSE_MEASURES = ("psi_variance", "weight_corr_within")  # flat psi maps / copied filters inside a group
MIN_ACCURACY = 90.0  # val top-1 (%) a network needs before its concepts are judged (the project's bar)


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


def _unlearned(runs: pd.DataFrame, accuracy: str, min_accuracy: float) -> dict[str, str]:
    """Per network (arch), why it carries no claim: the variants whose mean `accuracy` (%) is below `min_accuracy`."""
    out = {}
    for arch, rows in runs.groupby("arch", sort=False):
        means = rows.groupby("variant", sort=False)[accuracy].mean()
        low = means[means < min_accuracy]
        if len(low):
            out[arch] = ("val top-1 below " + f"{min_accuracy:.0f}%: " +
                         ", ".join(f"{variant} {value:.1f}%" for variant, value in low.items()) + " (task not learned)")
    return out


def claim_tests(synthetic: pd.DataFrame, synthetic_runs: pd.DataFrame, models: pd.DataFrame, groups: pd.DataFrame,
                purity: pd.DataFrame, *, min_accuracy: float, tolerance: float
                ) -> tuple[list[ClaimTest], dict[str, dict[str, str]]]:
    """Every test of G1-G8 (one per claim and network), and the networks a claim cannot be tested on,
    with the reason (`{claim: {network: reason}}`): every claim on a network with a variant below
    `min_accuracy` (G3: when its weight-decay baseline is; a drop is what G3 measures; the synthetic
    CNN, `SYNTHETIC_ARCH` in `groups`, by `synthetic_runs`), G6 on a network with BN (arch `*_bn`,
    `SCALE_FREE`), G8 on a network without a layer where the top group and another group both hold two
    detectors."""
    tests = []
    untestable: dict[str, dict[str, str]] = {f"G{i}": {} for i in range(1, 9)}
    synthetic_unlearned = _unlearned(synthetic_runs.assign(arch=SYNTHETIC_ARCH), "val_acc", min_accuracy)
    unlearned = {**_unlearned(models, "top1", min_accuracy), **synthetic_unlearned}
    tables = {"models": models, "groups": groups}
    for claim, (table, measure, treatment, direction, _) in PAIRED_CLAIMS.items():
        for arch, rows in tables[table].groupby("arch", sort=False):
            if arch in unlearned or (claim == "G6" and arch.endswith("_bn")):
                untestable[claim][arch] = unlearned.get(arch, SCALE_FREE)
                continue
            t, c = _paired(rows, measure, treatment)
            tests.append(ClaimTest(claim, arch, paired_effect(t, c, unit=UNIT, direction=direction)))
    for arch, rows in models.groupby("arch", sort=False):
        t, c = _paired(rows, "top1", "cgl")
        if c.mean() < min_accuracy:
            untestable["G3"][arch] = f"weight-decay top-1 {c.mean():.1f}% < {min_accuracy:.0f}% (task not learned)"
            continue
        tests.append(ClaimTest("G3", arch, bound_effect(c - t, unit=UNIT, bound=tolerance, direction="lower")))
    if synthetic_unlearned:
        untestable["G4"][SYNTHETIC] = synthetic_unlearned[SYNTHETIC_ARCH]
    else:
        t, c = _paired(synthetic[synthetic.layer == "conv2"], "total", "cgl")
        tests.append(ClaimTest("G4", SYNTHETIC, paired_effect(t, c, unit=UNIT, direction="higher")))
    pairs = purity_pairs(purity)
    for arch, rows in pairs.groupby("arch", sort=False):
        rows = rows.dropna(subset=["top", "others"])
        if arch in unlearned:
            untestable["G8"][arch] = unlearned[arch]
        elif not len(rows):
            untestable["G8"][arch] = "no layer where the top group and another had >= 2 detectors"
        else:
            tests.append(ClaimTest("G8", arch, paired_effect(rows.top, rows.others, unit=UNIT, direction="higher")))
    return tests, {claim: reasons for claim, reasons in untestable.items() if reasons}


def _ours(judged: list[Judged], untestable: dict[str, str], means: dict[str, str], digits: int) -> str:
    """Per network: the means compared, then the judged effect (or why it is not testable)."""
    parts = [j.text(digits, means.get(j.test.network, "")) for j in judged]
    parts += [f"{network}: not testable here ({reason})" if network else f"not testable here ({reason})"
              for network, reason in untestable.items()]
    return "; ".join(parts)


def _verdict(judged: list[Judged], untestable: dict[str, str]) -> str:
    return combine([j.verdict for j in judged] + ["not testable here"] * len(untestable))


def claim_results(reference: dict, synthetic: pd.DataFrame, synthetic_runs: pd.DataFrame, models: pd.DataFrame,
                  groups: pd.DataFrame, purity: pd.DataFrame, *, profile: str, min_accuracy: float = MIN_ACCURACY,
                  tolerance: float = 1.5) -> list[ClaimResult]:
    """The claims table rows (G1-G8): paper | ours | verdict, judged by the claims kit.

    The tables are `run_synthetic`'s (`synthetic`, `synthetic_runs`), `run_main`'s (`models`, `purity`)
    and `run_group_statistics`'s (`groups`); `reference` is the paper's numbers. `min_accuracy`: the val
    top-1 (%) every variant of a network needs (mean over seeds) before its concepts are judged.
    `tolerance`: the largest top-1 drop (points) G3 accepts (its bound).
    """
    claims = {c["id"]: c for c in reference["claims"]}
    reduced = "" if profile == "paper" else f"REDUCED ConceptWorld run ({profile}), not numerically comparable; "
    tests, untestable = claim_tests(synthetic, synthetic_runs, models, groups, purity, min_accuracy=min_accuracy,
                                    tolerance=tolerance)
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
        """Per network with the treatment variant: 'treatment mean vs control mean (relative change), <what> '
        before its effect."""
        out = {}
        for arch, rows in table.groupby("arch", sort=False):
            if treatment not in set(rows.variant):
                continue
            t, c = _paired(rows, measure, treatment)
            out[arch] = f"{t.mean():.{digits}f} vs {c.mean():.{digits}f} ({_relative(t.mean(), c.mean())}), {what} "
        return out

    def accuracies(runs: pd.DataFrame, column: str) -> str:
        """'val top-1 (mean over seeds): <net> wd x, R_bn y, CGL z (all plateaued | k of n plateaued)'."""
        parts = []
        for arch, rows in runs.groupby("arch", sort=False):
            mean = rows.groupby("variant", sort=False)[column].mean()
            flat = f"{int(rows.plateaued.sum())} of {len(rows)} curves plateaued" if "plateaued" in rows else ""
            parts.append(f"{arch} " + ", ".join(f"{variant} {value:.1f}%" for variant, value in mean.items()) +
                         (f" ({flat})" if flat else ""))
        return "val top-1 (mean over seeds): " + "; ".join(parts)

    both = accuracies(models, "top1") + "; " + accuracies(synthetic_runs.assign(arch=SYNTHETIC_ARCH), "val_acc").removeprefix(
        "val top-1 (mean over seeds): ")

    def result(cid: str, note: str, mean_text: dict[str, str], unit: str, digits: int = 3,
               seed_list: str = seeds, accuracy: str = accuracies(models, "top1")) -> ClaimResult:
        mine = [j for j in judged if j.test.claim_id == cid]
        blocked = untestable.get(cid, {})
        return ClaimResult(claim_id=cid, claim=claims[cid]["claim"], paper=claims[cid]["paper"],
                           ours=_ours(mine, blocked, mean_text, digits), verdict=_verdict(mine, blocked),
                           note=f"{reduced}{note}; {accuracy}{family}", unit=unit, seeds=seed_list)

    per_network = f"training seeds, n={n_models} per network"
    group_counts = groups.groupby(["arch", "variant"], sort=False).size().groupby(level=0, sort=False).min()
    per_group_network = per_network if group_counts.nunique() == 1 else "training seeds, " + ", ".join(
        f"{arch} n={n}" for arch, n in group_counts.items())
    tables = {"models": models, "groups": groups}
    mean_texts = {cid: means(tables[table], measure, treatment, digits)
                  for cid, (table, measure, treatment, _, digits) in PAIRED_CLAIMS.items()}
    checks = {claim: f"manipulation check (the trained {loss}, not evidence), CGL vs weight decay: " + "; ".join(
                  f"{arch} {text.removesuffix(', diff ')}" for arch, text in means(groups, measure, "cgl", digits).items())
              for claim, (measure, loss, digits) in TRAINED_MEASURES.items()}
    collapse = "collapse diagnostics, CGL vs weight decay: " + "; ".join(
        f"{measure} " + "; ".join(f"{arch} {text.removesuffix(', diff ')}"
                                  for arch, text in means(groups, measure, "cgl", 3).items())
        for measure in COLLAPSE_MEASURES)
    paper = "; ".join(f"{m}-{d}: {c} vs {w} ({_relative(c, w)})" for (d, m), c, w in t2)
    results = [result("G1", f"paper pairs {paper}; unique detectors summed over the dissected layers",
                      mean_texts["G1"], per_network, digits=1)]
    paper = "; ".join(f"{m}-{d}: {v['cgl']['rud']:.3f} vs {v['weight_decay']['rud']:.3f} "
                      f"({_relative(v['cgl']['rud'], v['weight_decay']['rud'])})" for (d, m), v in t3.items())
    results.append(result("G2", f"paper {paper}; RUD of the last two dissected layers", mean_texts["G2"], per_network))
    paper = "; ".join(f"{m}-{d}: drop {v['weight_decay']['top1'] - v['cgl']['top1']:.2f}" for (d, m), v in t3.items())
    results.append(result("G3", f"paper top-1 {paper} points; CGL and weight decay trained alike (same recipe, "
                          f"epochs, seed); confirmed when the drop's interval lies below {tolerance} points, refuted "
                          f"when it lies above; not testable on a baseline below {min_accuracy:.0f}%",
                          means(models, "top1", "cgl", 1, "drop (points)"), per_network, digits=2))
    paper_c, paper_w = t1[("cgl", "conv2")], t1[("weight_decay", "conv2")]
    t, c = _paired(synthetic[synthetic.layer == "conv2"], "total", "cgl")
    results.append(result("G4", f"paper {paper_c} vs {paper_w} of 15 ({_relative(paper_c, paper_w)}); conv2 unique "
                          "detectors", {SYNTHETIC: f"{t.mean():.1f} vs {c.mean():.1f} of 15 "
                                                   f"({_relative(t.mean(), c.mean())}), diff "},
                          f"training seeds, n={n_synthetic}", digits=1, seed_list=synthetic_seeds,
                          accuracy=accuracies(synthetic_runs.assign(arch=SYNTHETIC), "val_acc")))
    results.append(result("G5", "mean IoU of two units' thresholded masks (top-quantile T_k, val images) within a group "
                          f"minus across groups, which no loss trains; {checks['G5']}; {collapse}",
                          mean_texts["G5"], per_group_network, accuracy=both))
    results.append(result("G6", f"top group's share of beta_l (1/G = {1 / GROUPS:.2f} when uniform), R_bn vs weight decay",
                          mean_texts["G6"], per_group_network, accuracy=both))
    results.append(result("G7", "share of the map above T_k in each unit's top-K images (the spec's above-T_k region; "
                          f"lower = more compact), which no loss trains; {checks['G7']}", mean_texts["G7"], per_group_network,
                          accuracy=both))
    pairs = purity_pairs(purity).dropna(subset=["top", "others"])
    purity_means = {arch: f"{rows.top.mean():.2f} vs {rows.others.mean():.2f} ({int(rows.layers.sum())} layers), diff "
                    for arch, rows in pairs.groupby("arch", sort=False)}
    purity_unit = "training seeds with such a layer: " + (
        ", ".join(f"{arch} n={n}" for arch, n in pairs.groupby("arch", sort=False).size().items()) or "none")
    results.append(result("G8", "CGL models: detector purity (share of a group's detectors with its most common label) "
                          "of each dissected grouped layer's most relevant group (largest beta) vs its other groups, "
                          "averaged over the layers where both hold >= 2 detectors; the alignment threshold T is "
                          "unknown [U], the dissection IoU threshold stands in [I]", purity_means, purity_unit, digits=2))
    return results

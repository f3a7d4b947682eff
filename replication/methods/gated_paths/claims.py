"""NAD's claims N1-N7 judged through the claims kit: `claim_tests` (the tests) and `claim_results` (the table).

The unit of replication is the class (one network per connection type is searched once, so seeds are
not the unit): per class, its path's accuracy drop and share of units kept (N1), the share of its
rule concepts detected on its path against same-size random unit sets (N2), its deep hit rate against
chance and against another class's path (N4), its hit-rate drop between the layer pair that falls most
(N5, corrected for the pairs searched), its hit-rate curve's distance between networks of different
connection types against networks of one type (N6); misclassified images are clustered by their true
class (N7). One Holm family over every test; networks combined by `reporting.claims.combine`.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

import numpy as np
import pandas as pd

from replication.methods.gated_paths.experiment import ArchitectureResult
from replication.methods.gated_paths.metrics import class_hit_rates, curve_distance, deep_hit_rates, largest_dip
from replication.reporting.claims import (ClaimResult, ClaimTest, Judged, bound_effect, cluster_means, combine,
                                          judge_tests, network_verdicts, paired_effect)

CONNECTION_TYPES = ("plain", "residual", "dense", "nas")  # the paper's four (v1 abstract): handcrafted to autoML
UNIT = "classes"


def val_accuracy(result: ArchitectureResult) -> float:
    """The network's val accuracy (mean over classes): below the bar, no claim is judged on it."""
    return float(result.accuracy["original_accuracy"].mean())


def _n6_pairs(results: Mapping[str, ArchitectureResult]):
    """The hit-rate curves per network, the network pairs of one arch (`within`, the null) and of different
    connection types (`between`), and the classes every network has a complete curve for."""
    curves = {name: class_hit_rates(r.hits) for name, r in results.items()}
    names = list(results)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    within = [(a, b) for a, b in pairs if results[a].arch == results[b].arch]
    between = [(a, b) for a, b in pairs if results[a].family != results[b].family]
    classes = sorted(set.intersection(*(set(c.index) for c in curves.values()))) if curves else []
    complete = [c for c in classes if all(curves[name].loc[c].notna().all() for name in names)]

    def mean_distance(pair_list: list[tuple[str, str]], class_id: int) -> float:
        return float(np.mean([curve_distance(curves[a].loc[class_id].to_numpy(), curves[b].loc[class_id].to_numpy())
                              for a, b in pair_list]))

    return within, between, complete, mean_distance


def _n6_test(results: Mapping[str, ArchitectureResult]) -> tuple[ClaimTest | None, str, str]:
    """N6 on classes: per class, the mean hit-rate curve distance between networks of different connection
    types minus that between networks of one arch trained alike with other seeds (the null: how far
    networks differ by their seed alone; two archs of one type, e.g. AlexNet and VGG, enter neither).
    Returns the test (None when it cannot be run), the reason it cannot, and the means compared."""
    within, between, complete, mean_distance = _n6_pairs(results)
    if not within or not between:
        counts = ", ".join(f"{arch} {n}" for arch, n in Counter(r.arch for r in results.values()).items()) or "none"
        return None, (f"networks per arch: {counts}; the null needs two networks of one arch trained alike, "
                      "and a network of a second connection type to compare"), ""
    b = [mean_distance(between, c) for c in complete]
    w = [mean_distance(within, c) for c in complete]
    effect = paired_effect(b, w, unit=UNIT, direction="higher")
    return ClaimTest("N6", "", effect), "", f"between types {np.mean(b):.3f} vs between seeds {np.mean(w):.3f}, diff "


def n6_distances(results: Mapping[str, ArchitectureResult], *, min_accuracy: float = 0.9) -> pd.DataFrame:
    """N6's two sides taken apart: per arch, the mean curve distance between its networks (its share of
    the null), and the distance between connection types; mean and SD over the classes N6 uses. Only
    networks at or above `min_accuracy` val accuracy, as in `claim_tests`."""
    learned = {name: r for name, r in results.items() if val_accuracy(r) >= min_accuracy}
    within, between, complete, mean_distance = _n6_pairs(learned)
    groups = {f"between seeds of {arch}": [(a, b) for a, b in within if learned[a].arch == arch]
              for arch in dict.fromkeys(r.arch for r in learned.values())}
    groups["between connection types"] = between
    rows = []
    for comparison, pairs in groups.items():
        if pairs and complete:
            values = [mean_distance(pairs, c) for c in complete]
            rows.append({"comparison": comparison, "network_pairs": len(pairs), "classes": len(complete),
                         "mean_distance": float(np.mean(values)), "sd_over_classes": float(np.std(values, ddof=1))
                         if len(values) > 1 else np.nan})
    return pd.DataFrame(rows, columns=["comparison", "network_pairs", "classes", "mean_distance", "sd_over_classes"])


def claim_tests(results: Mapping[str, ArchitectureResult], concepts: Mapping[str, pd.DataFrame] | None = None, *,
                chance: float = 0.25, max_accuracy_drop: float = 0.05, max_units_kept: float = 0.5,
                deep_layers: int = 3, min_accuracy: float = 0.9,
                ) -> tuple[list[ClaimTest], dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """Every test of N1-N7 (one per claim, network and condition), the networks a claim cannot be tested
    on with the reason (`{claim: {network: reason}}`, network "" for a claim on all networks), and the
    numbers shown before each effect (`{claim: {network: text}}`).

    N1: per class, accuracy drop (original - path) below `max_accuracy_drop`, units kept below
    `max_units_kept`, and the share of other classes' images the path labels as its class at most
    `max_accuracy_drop` above the original's (specificity: a path that only biases the net fails).
    N2: per class, own rule concepts found on the path minus on random unit sets of the same per-layer sizes (needs `concepts`, the `path_concepts` tables). N3: N1 on networks of all
    four `CONNECTION_TYPES`. N4: per class, deep hit rate (last `deep_layers` locations) above `chance`
    and above the control (another class's path on the same quadrants). N5: per class, the drop of
    the largest dip, corrected for the layer pairs searched. N6: `_n6_test`. N7: the rank of
    s(true, predicted) among s(true, .), per true class, above 0.5 (chance).
    A network whose val accuracy (mean over classes) is below `min_accuracy` has not learned the
    task: no claim is judged on it (each says why) and N6 leaves it out.
    """
    tests: list[ClaimTest] = []
    untestable: dict[str, dict[str, str]] = {cid: {} for cid in ("N1", "N2", "N3", "N4", "N5", "N6", "N7")}
    details: dict[str, dict[str, str]] = {cid: {} for cid in ("N2", "N5", "N6")}
    learned = {}
    for arch, r in results.items():
        accuracy = val_accuracy(r)
        if accuracy < min_accuracy:
            for cid in ("N1", "N2", "N4", "N5", "N7"):
                untestable[cid][arch] = f"val accuracy {accuracy:.3f} below the {min_accuracy} bar"
        else:
            learned[arch] = r
    results = learned
    for arch, r in results.items():
        drop = r.accuracy["original_accuracy"] - r.accuracy["path_accuracy"]
        tests.append(ClaimTest("N1", arch, bound_effect(drop, unit=UNIT, bound=max_accuracy_drop, direction="lower"),
                               "accuracy drop"))
        tests.append(ClaimTest("N1", arch, bound_effect(r.accuracy["units_kept"], unit=UNIT, bound=max_units_kept,
                                                        direction="lower"), "units kept"))
        added = r.accuracy["path_false_positive"] - r.accuracy["original_false_positive"]
        tests.append(ClaimTest("N1", arch, bound_effect(added, unit=UNIT, bound=max_accuracy_drop, direction="lower"),
                               "false positives added on other classes"))
        table = (concepts or {}).get(arch)
        if table is None or not table["own_concepts_found_all_units"].any():
            untestable["N2"][arch] = "no unit of the network detects a rule concept of any class (or no concept labels)"
        else:
            details["N2"][arch] = (f"own concepts on the path {table['own_concepts_found'].mean():.2f} vs same-size "
                                   f"random {table['own_concepts_found_random'].mean():.2f}, diff ")
            tests.append(ClaimTest("N2", arch, paired_effect(table["own_concepts_found"],
                                                             table["own_concepts_found_random"], unit=UNIT)))
        own = deep_hit_rates(r.hits, deep_layers)
        control = deep_hit_rates(r.control_hits, deep_layers).reindex(own.index)
        kept = own.notna() & control.notna()
        tests.append(ClaimTest("N4", arch, bound_effect(own[kept], unit=UNIT, bound=chance), "vs chance"))
        tests.append(ClaimTest("N4", arch, paired_effect(own[kept], control[kept], unit=UNIT), "vs control"))
        dip = largest_dip(class_hit_rates(r.hits))
        details["N5"][arch] = f"layers {dip['from_layer']}->{dip['to_layer']} of {dip['searched']} pairs, drop "
        tests.append(ClaimTest("N5", arch, bound_effect(dip["drops"], unit=UNIT, searched=dip["searched"])))
        wrong = r.misclassification
        if len(wrong) == 0:
            untestable["N7"][arch] = "no misclassified val image"
        else:
            ranks = cluster_means(wrong["rank"], wrong["true"])
            tests.append(ClaimTest("N7", arch, bound_effect(ranks, unit="true classes", bound=0.5)))
    missing = [t for t in CONNECTION_TYPES if t not in {r.family for r in results.values()}]
    if not results:
        untestable["N3"][""] = f"no network reached the {min_accuracy} val accuracy bar"
    elif missing:
        untestable["N3"][""] = (f"no {', '.join(missing)} network here that learned the task; the claim is about "
                                "all four connection types")
    n6, reason, detail = _n6_test(results)
    if n6 is None:
        untestable["N6"][""] = reason
    else:
        tests.append(n6)
        details["N6"][""] = detail
    return tests, untestable, details


def _ours(judged: list[Judged], blocked: Mapping[str, str], details: Mapping[str, str]) -> str:
    parts = [j.text(3, details.get(j.test.network, "")) for j in judged]
    parts += [f"{network}: not testable here ({reason})" if network else f"not testable here ({reason})"
              for network, reason in blocked.items()]
    return "; ".join(parts)


def _verdict(claim_id: str, judged: list[Judged], blocked: Mapping[str, str]) -> str:
    per_network = network_verdicts(judged, claim_id)
    return combine(list(per_network.values()) + ["not testable here"] * len(blocked))


def claim_results(results: Mapping[str, ArchitectureResult], concepts: Mapping[str, pd.DataFrame] | None,
                  reference: Mapping[str, Any], *, profile: str, search_seed: int, chance: float = 0.25,
                  max_accuracy_drop: float = 0.05, max_units_kept: float = 0.5,
                  min_accuracy: float = 0.9) -> list[ClaimResult]:
    """The claims table of notebook 05: each claim's text and paper value from `reference`
    (`reporting.claims.load_reference`), our judged effects (`claim_tests`, one Holm family), the unit
    and n, a reduced-run note under every profile but `paper`, the networks and the search seed."""
    claims = {c["id"]: c for c in reference["claims"]}
    tests, untestable, details = claim_tests(results, concepts, chance=chance, max_accuracy_drop=max_accuracy_drop,
                                             max_units_kept=max_units_kept, min_accuracy=min_accuracy)
    judged = judge_tests(tests)
    reduced = "" if profile == "paper" else f"REDUCED RUN ({profile}); "
    family = f"; Holm over the notebook's {len(tests)} tests"
    n_classes = ", ".join(f"{arch} n={len(r.accuracy)}" for arch, r in results.items())
    n_true = ", ".join(f"{arch} n={r.misclassification['true'].nunique()}" for arch, r in results.items())
    notes = {
        "N1": (f"per class: accuracy drop (original - path) below {max_accuracy_drop}, share of units kept below "
               f"{max_units_kept}, and false positives on other classes' images at most {max_accuracy_drop} above "
               "the original's (specificity); all three needed", f"classes: {n_classes}"),
        "N2": ("our reading [I]: the class's rule concepts detected (Network Dissection) on its path vs on random "
               "unit sets of the same per-layer sizes", f"classes: {n_classes}"),
        "N3": ("N1 on a network of each of the four connection types (plain, residual, dense, NAS-derived)",
               "networks (connection types)"),
        "N4": (f"per class: mean hit rate at the last 3 gate locations vs chance {chance} and vs another class's "
               "path on the same quadrants (control), both needed", f"classes: {n_classes}"),
        "N5": ("per class: hit-rate drop between the layer pair whose mean falls most; interval and p corrected "
               "(Bonferroni) for the pairs searched", f"classes: {n_classes}"),
        "N6": ("per class: hit-rate curve distance (normalised depth) between networks of different connection "
               "types minus between networks of one type", "classes"),
        "N7": ("rank of s(true, predicted) among s(true, .), 0.5 = chance; misclassified val images averaged per "
               "true class", f"true classes: {n_true}"),
    }
    rows = []
    for cid, (note, unit) in notes.items():
        mine = [j for j in judged if j.test.claim_id == cid]
        blocked = untestable.get(cid, {})
        if cid == "N3" and not blocked:  # all four types present: N3 is N1 on them
            verdict = combine(list(network_verdicts(judged, "N1").values()))
            ours = "N1 per network: " + "; ".join(f"{a} ({results[a].family}): {v}"
                                                   for a, v in network_verdicts(judged, "N1").items())
        else:
            verdict, ours = _verdict(cid, mine, blocked), _ours(mine, blocked, details.get(cid, {}))
        rows.append(ClaimResult(claim_id=cid, claim=claims[cid]["claim"], paper=claims[cid]["paper"], ours=ours,
                                verdict=verdict, note=reduced + note + family, unit=unit,
                                seeds=f"networks {', '.join(results)}; search seed {search_seed}"))
    return rows

"""NAD's claims N1-N7: the verdict rules (`claim_rows`) and the claims table rows (`claim_results`)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from replication.methods.gated_paths.experiment import ArchitectureResult
from replication.methods.gated_paths.metrics import curve_distance, largest_dip
from replication.methods.gated_paths.similarity import path_diversity_se
from replication.reporting.claims import ClaimResult

def _deep_hit(summary: pd.DataFrame, last: int = 3) -> tuple[float, float]:
    """Mean hit rate over the last `last` gate locations (the number `cam_2x2.py` prints) and its SE."""
    tail = summary.tail(last)
    se = (tail["hit_std"] / np.sqrt(tail["n_mosaics"])).to_numpy()
    return float(tail["hit_rate"].mean()), float(np.sqrt(np.sum(se ** 2)) / len(tail))


def _overall(holds: Sequence[bool]) -> str:
    return "confirmed" if all(holds) else ("refuted" if not any(holds) else "not confirmed")


def claim_rows(results: Mapping[str, ArchitectureResult], concepts: Mapping[str, pd.DataFrame] | None = None, *,
               chance: float = 0.25, max_accuracy_drop: float = 0.05, max_units_kept: float = 0.5) -> list[dict]:
    """Claims N1-N7 with our numbers and a verdict by the stated rule (spec section 2; rules [I]).

    N1/N3: per network, path accuracy within `max_accuracy_drop` of the original and fewer than
    `max_units_kept` of the units kept. N4: deep hit rate (last three locations) above `chance` by
    more than 2 SE and above the shifted-path control. N5: some network's largest dip is significant
    (`largest_dip`). N6: some pair of curves differs by more than twice the mean per-layer SE.
    N7: mean normalised rank of misclassified images above 0.5 by more than 2 SE (below: refuted).
    N2: diversity (1 - mean path similarity) differs between networks by more than twice the largest
    jackknife SE. All-network rules: 'confirmed' if every network passes, 'refuted' if none does.
    """
    rows, archs = [], list(results)

    def row(claim_id, ours, verdict, note=""):
        rows.append({"claim_id": claim_id, "ours": ours, "verdict": verdict, "note": note})

    n1 = {}
    for arch, r in results.items():
        drop = float((r.accuracy["original_accuracy"] - r.accuracy["path_accuracy"]).mean())
        kept = float(r.accuracy["units_kept"].mean())
        n1[arch] = (drop, kept, drop <= max_accuracy_drop and kept < max_units_kept)
    row("N1", "; ".join(f"{a}: acc drop {d:+.3f}, kept {k:.2f}" for a, (d, k, _) in n1.items()),
        _overall([h for *_, h in n1.values()]),
        f"rule: mean over classes, drop <= {max_accuracy_drop}, kept < {max_units_kept}")
    diversity = {a: (r.diversity, path_diversity_se(r.similarity)) for a, r in results.items()}
    spread = max(d for d, _ in diversity.values()) - min(d for d, _ in diversity.values())
    largest_se = max((s for _, s in diversity.values() if not math.isnan(s)), default=float("nan"))
    concept_text = ""
    if concepts:
        concept_text = "; distinct concepts per path " + ", ".join(
            f"{a}: {t['distinct_concepts'].mean():.1f}" for a, t in concepts.items())
    row("N2", "diversity " + ", ".join(f"{a}: {d:.3f}±{s:.3f}" for a, (d, s) in diversity.items()) + concept_text,
        "confirmed" if spread > 2 * largest_se else "inconclusive",
        "metric reconstructed [I]; rule: spread between networks > 2 x largest jackknife SE")
    row("N3", f"paths learned for {', '.join(f'{a} ({results[a].family})' for a in archs)}",
        _overall([n1[a][2] for a in archs]),
        "ConceptWorld instead of ImageNet/Places365; no NAS-cell (DARTS) network; rule: N1 per network")
    n4 = {}
    for arch, r in results.items():
        mean, se = _deep_hit(r.hit_summary)
        control, _ = _deep_hit(r.control_summary)
        n4[arch] = (mean, se, control, mean - chance > 2 * se and mean > control)
    row("N4", "; ".join(f"{a}: {m:.3f}±{s:.3f} (control {c:.3f})" for a, (m, s, c, _) in n4.items()),
        _overall([h for *_, h in n4.values()]), f"last three gate locations; chance {chance}")
    dips = {a: largest_dip(r.hit_summary) for a, r in results.items()}
    row("N5", "; ".join(f"{a}: drop {d['drop']:.3f} (layer {d['from_layer']}->{d['to_layer']}"
                        f"{', significant' if d['significant'] else ''})" for a, d in dips.items()),
        "confirmed" if any(d["significant"] for d in dips.values()) else "not confirmed",
        "rule: some network's hit rate falls significantly from a shallower to a deeper layer")
    distances, noise = {}, []
    for i, a in enumerate(archs):
        noise.append(float((results[a].hit_summary["hit_std"] / np.sqrt(results[a].hit_summary["n_mosaics"])).mean()))
        for b in archs[i + 1:]:
            distances[f"{a}/{b}"] = curve_distance(results[a].hit_summary, results[b].hit_summary)
    threshold = 2 * float(np.mean(noise)) if noise else float("nan")
    row("N6", "curve distance " + ", ".join(f"{k}: {v:.3f}" for k, v in distances.items()) + f" (2 SE = {threshold:.3f})",
        "confirmed" if distances and max(distances.values()) > threshold else "not confirmed",
        "rule: some pair of hit-rate curves (normalised depth) differs by more than 2 x mean per-layer SE")
    n7 = {}
    for arch, r in results.items():
        ranks = r.misclassification["rank"].to_numpy()
        if len(ranks) < 2:
            n7[arch] = (float("nan"), float("nan"), len(ranks), None)
            continue
        mean, se = float(ranks.mean()), float(ranks.std(ddof=1) / np.sqrt(len(ranks)))
        n7[arch] = (mean, se, len(ranks), mean - 0.5 > 2 * se if abs(mean - 0.5) > 2 * se else None)
    decided = [h for *_, h in n7.values() if h is not None]
    verdict = "inconclusive" if len(decided) < len(n7) else _overall(decided)
    row("N7", "; ".join(f"{a}: rank {m:.2f}±{s:.2f} (n={n})" for a, (m, s, n, _) in n7.items()), verdict,
        "rank of s(true, predicted) among s(true, .), 0.5 = chance; rule: |mean - 0.5| > 2 SE per network")
    return rows


def claim_results(results: Mapping[str, ArchitectureResult], concepts: Mapping[str, pd.DataFrame] | None,
                  reference: Mapping[str, Any], *, profile: str, seed: int) -> list[ClaimResult]:
    """The claims table of notebook 05: `claim_rows` with each claim's text and paper value from
    `reference` (`reporting.claims.load_reference`), a reduced-run note under every profile but
    `paper`, and the seed of the networks."""
    claims = {c["id"]: c for c in reference["claims"]}
    reduced = "" if profile == "paper" else f"REDUCED RUN ({profile}); "
    return [ClaimResult(claim_id=row["claim_id"], claim=claims[row["claim_id"]]["claim"], paper=claims[row["claim_id"]]["paper"],
                        ours=row["ours"], verdict=row["verdict"], note=reduced + row["note"],
                        seeds=f"seed {seed}, one network per arch")
            for row in claim_rows(results, concepts)]

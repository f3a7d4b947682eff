"""Notebook 00's claim (Network Dissection's rotation test) judged through the claims kit."""
from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from replication.reporting.claims import ClaimResult, ClaimTest, combine, judge_tests, paired_effect


def rotation_claim(rotation: pd.DataFrame, reference: Mapping[str, Any], *, profile: str) -> ClaimResult:
    """D1: per training seed (the unit), unique detectors in the unit basis (alpha 0) minus in the fully
    rotated basis (the largest alpha), expected > 0; one test per network (`arch` and `layer` columns),
    the tests one Holm family, the networks' verdicts combined. `rotation` is one `rotation_study` per
    network and model seed, stacked with `arch`, `layer` and `model_seed` columns."""
    tests, details, seeds = [], [], []
    for (arch, layer), study in rotation.groupby(["arch", "layer"], sort=False):
        wide = study.pivot_table(index="model_seed", columns="alpha", values="unique_detectors")
        low, high = wide.columns.min(), wide.columns.max()
        tests.append(ClaimTest("D1", f"{arch} {layer}", paired_effect(wide[low], wide[high], unit="seeds", direction="higher")))
        details.append(f"unique detectors at alpha {low:g}: {wide[low].mean():.2f}, at alpha {high:g}: {wide[high].mean():.2f}; fall ")
        seeds.append(len(wide))
    judged = judge_tests(tests)
    claim = {c["id"]: c for c in reference["claims"]}["D1"]
    reduced = "" if profile == "paper" else f"REDUCED ConceptWorld run ({profile}); "
    return ClaimResult(claim_id="D1", claim=claim["claim"], paper=claim["paper"],
                       ours="; ".join(j.text(2, detail) for j, detail in zip(judged, details)),
                       verdict=combine([j.verdict for j in judged]),
                       note=reduced + "paired per seed: unit basis minus the fully rotated basis (one seeded rotation "
                       "per model); one test per network in the notebook's family",
                       unit=f"training seeds, n={min(seeds)}" + (f" per network, {len(tests)} networks" if len(tests) > 1 else ""),
                       seeds=", ".join(str(s) for s in sorted(rotation["model_seed"].unique())))

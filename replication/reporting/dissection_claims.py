"""Notebook 00's claim (Network Dissection's rotation test) judged through the claims kit."""
from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from replication.reporting.claims import ClaimResult, ClaimTest, combine, judge_tests, paired_effect


def rotation_claim(rotation: pd.DataFrame, reference: Mapping[str, Any], *, profile: str) -> ClaimResult:
    """D1: per training seed (the unit), unique detectors in the unit basis (alpha 0) minus in the fully
    rotated basis (the largest alpha), expected > 0. `rotation` is one `rotation_study` per model seed,
    stacked with a `model_seed` column."""
    wide = rotation.pivot_table(index="model_seed", columns="alpha", values="unique_detectors")
    low, high = wide.columns.min(), wide.columns.max()
    effect = paired_effect(wide[low], wide[high], unit="seeds", direction="higher")
    judged = judge_tests([ClaimTest("D1", "", effect)])[0]
    claim = {c["id"]: c for c in reference["claims"]}["D1"]
    detail = f"unique detectors at alpha {low:g}: {wide[low].mean():.2f}, at alpha {high:g}: {wide[high].mean():.2f}; fall "
    reduced = "" if profile == "paper" else f"REDUCED ConceptWorld run ({profile}); "
    return ClaimResult(claim_id="D1", claim=claim["claim"], paper=claim["paper"], ours=judged.text(2, detail),
                       verdict=combine([judged.verdict]),
                       note=reduced + "paired per seed: unit basis minus the fully rotated basis (one seeded rotation "
                       "per model); one test in the notebook's family",
                       unit=f"training seeds, n={len(wide)}", seeds=", ".join(str(s) for s in wide.index))

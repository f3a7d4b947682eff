"""Paper | ours | verdict tables.

The papers' numbers live as data in `reporting/reference/<NN_name>.json`, each with its source, so no
notebook or test ever types a published number. Every notebook writes its claims table to
`results/<NN_name>/claims.csv`; `replication reproduce` gathers them into `results/README.md`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from replication import io

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
VERDICTS = ("confirmed", "not confirmed", "refuted", "inconclusive", "not measured")
CLAIMS_FILE = "claims.csv"


def load_reference(name: str) -> dict[str, Any]:
    """The reference numbers of paper `name` (e.g. "03_concept_group_learning")."""
    path = REFERENCE_DIR / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))
        raise FileNotFoundError(f"no reference numbers for {name!r}; known: {known}")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class ClaimResult:
    """One row of a claims table. `paper` and `ours` are short human-readable strings."""

    claim_id: str
    claim: str
    paper: str
    ours: str
    verdict: str
    note: str = ""
    seeds: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


def mean_std(values: Iterable[float], digits: int = 2) -> str:
    """'m ± s (n=k)' for a list of per-seed values; a single value is printed alone."""
    array = np.asarray(list(values), dtype=float)
    if array.size == 0:
        return "n/a"
    if array.size == 1:
        return f"{array[0]:.{digits}f} (n=1)"
    return f"{array.mean():.{digits}f} ± {array.std(ddof=1):.{digits}f} (n={array.size})"


def directional_verdict(
    treatment: Sequence[float],
    control: Sequence[float],
    *,
    direction: str = "higher",
    min_seeds: int = 3,
    min_relative_effect: float = 0.05,
) -> str:
    """Does `treatment` beat `control` in the stated direction, beyond seed-to-seed noise and by enough to matter?

    Rule [I]: with at least `min_seeds` paired seeds, take the per-seed differences in the claimed
    direction. 'refuted' when their mean is below minus its standard error; otherwise 'confirmed' when
    it exceeds its standard error and is at least `min_relative_effect` of the control's mean magnitude;
    'not confirmed' when it is beyond the noise but smaller than that (a consistent but negligible
    effect); else 'inconclusive'. Fewer seeds give 'inconclusive' whatever the means say.
    """
    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    if t.shape != c.shape or t.size == 0:
        raise ValueError(f"need paired per-seed values, got {t.size} treatment and {c.size} control values")
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction must be 'higher' or 'lower', not {direction!r}")
    diff = (t - c) if direction == "higher" else (c - t)
    if diff.size < min_seeds:
        return "inconclusive"
    stderr = diff.std(ddof=1) / math.sqrt(diff.size)
    if diff.mean() < -stderr:
        return "refuted"
    if diff.mean() > stderr:
        return "confirmed" if diff.mean() >= min_relative_effect * abs(c.mean()) else "not confirmed"
    return "inconclusive"


def claims_table(rows: Iterable[ClaimResult]) -> pd.DataFrame:
    """A DataFrame with one row per claim, columns in reading order."""
    frame = pd.DataFrame([asdict(r) for r in rows])
    return frame[["claim_id", "claim", "paper", "ours", "verdict", "note", "seeds"]]


def write_claims(folder: str | Path, table: pd.DataFrame, *, paper: str, profile: str) -> Path:
    """Save a notebook's claims table (CSV) where the runner's summary will find it."""
    table = table.assign(paper_id=paper, profile=profile)
    return io.write_csv(Path(folder) / CLAIMS_FILE, table)

"""Paper | ours | verdict tables, and the one statistical rule every notebook judges its claims by.

The papers' numbers live as data in `reporting/reference/<NN_name>.json`, each with its source, so no
notebook or test ever types a published number. Every notebook writes its claims table to
`results/<NN_name>/claims.csv`; `replication reproduce` gathers them into `results/README.md`.

The rule (the same in every notebook):
- Each claim states its unit of replication (training seeds; or classes, class pairs, or images
  clustered by class where seeds are not the unit) and is measured as one value per unit: a paired
  difference (`paired_effect`) or a value against a stated bound (`bound_effect`).
- The effect gets a two-sided 95% confidence interval (t with n-1 degrees of freedom) and a two-sided
  t-test against the null or the bound (scipy.stats).
- A notebook's tests form one family: `judge` adjusts their p-values by Holm's method and calls a claim
  confirmed when the adjusted test rejects on the paper's side, refuted when it rejects on the other
  side, and inconclusive otherwise, reported with the minimal detectable effect at 80% power for the
  n used (statsmodels). A claim the setting cannot test is "not testable here", with the reason.
- Several networks: `combine` gives one word for the claim (confirmed / refuted only when every
  network agrees; partly confirmed / partly refuted when the others are inconclusive; mixed when some
  confirm and some refute).
- Every ± names its spread: `mean_spread(values, "SD")` or `"SE"`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from replication import io

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
VERDICTS = ("confirmed", "refuted", "inconclusive", "not testable here",
            "partly confirmed", "partly refuted", "mixed",
            "not confirmed", "not measured")  # the last two: older rules, until every paper uses `judge`
ALPHA = 0.05
POWER = 0.8
DIRECTIONS = ("higher", "lower")
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


def mean_spread(values: Iterable[float], spread: str = "SD", digits: int = 2) -> str:
    """'m ± s SD (n=k)' (or SE): the spread is always named; a single value is printed alone."""
    if spread not in ("SD", "SE"):
        raise ValueError(f"spread must be 'SD' or 'SE', not {spread!r}")
    array = np.asarray(list(values), dtype=float)
    if array.size == 0:
        return "n/a"
    if array.size == 1:
        return f"{array[0]:.{digits}f} (n=1)"
    sd = array.std(ddof=1)
    value = sd if spread == "SD" else sd / math.sqrt(array.size)
    return f"{array.mean():.{digits}f} ± {value:.{digits}f} {spread} (n={array.size})"


@dataclass(frozen=True)
class Effect:
    """A claim's measured effect on its unit of replication.

    `mean` is the mean over units of the measured values (paired differences, or raw values tested
    against `bound`); `ci_low`/`ci_high` its two-sided 95% t-interval; `p_value` the two-sided t-test
    of mean = bound; `mde` the smallest |mean - bound| a test at this n and SD detects with 80% power.
    `direction` is the paper's side: "higher" (mean > bound) or "lower" (mean < bound).
    """

    mean: float
    ci_low: float
    ci_high: float
    sd: float
    n: int
    unit: str
    bound: float
    direction: str
    p_value: float
    mde: float

    @property
    def on_papers_side(self) -> bool:
        return self.mean > self.bound if self.direction == "higher" else self.mean < self.bound

    def describe(self, digits: int = 2) -> str:
        """'mean [low, high] 95% CI, n=k units' (with the SD), for the claims table."""
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n={self.n} {self.unit}: no interval)"
        return (f"{self.mean:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}] 95% CI, "
                f"SD {self.sd:.{digits}f}, n={self.n} {self.unit}")


def bound_effect(values: Sequence[float], *, unit: str, bound: float = 0.0, direction: str = "higher") -> Effect:
    """The effect of per-unit `values` against `bound` (0 for a paired difference, or a stated tolerance)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"need one finite value per {unit or 'unit'}, got {x.tolist()}")
    n, mean = int(x.size), float(x.mean())
    if n < 2:
        return Effect(mean, math.nan, math.nan, math.nan, n, unit, bound, direction, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    if sd == 0:  # identical units: the sign decides, no test statistic exists
        p_value = 1.0 if mean == bound else 0.0
        return Effect(mean, mean, mean, 0.0, n, unit, bound, direction, p_value, 0.0)
    low, high = stats.t.interval(1 - ALPHA, df=n - 1, loc=mean, scale=sd / math.sqrt(n))
    p_value = float(stats.ttest_1samp(x, popmean=bound).pvalue)
    d = TTestPower().solve_power(nobs=n, alpha=ALPHA, power=POWER, alternative="two-sided")
    return Effect(mean, float(low), float(high), sd, n, unit, bound, direction, p_value, float(d) * sd)


def paired_effect(treatment: Sequence[float], control: Sequence[float], *, unit: str, direction: str = "higher",
                  margin: float = 0.0) -> Effect:
    """The effect of treatment - control over paired units (e.g. seeds), against `margin` (0: any difference)."""
    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    if t.shape != c.shape:
        raise ValueError(f"need paired values per {unit or 'unit'}, got {t.size} treatment and {c.size} control values")
    return bound_effect(t - c, unit=unit, bound=margin, direction=direction)


def cluster_means(values: Sequence[float], clusters: Sequence[Any]) -> np.ndarray:
    """One mean per cluster (e.g. per class), in first-seen order: the unit when images are not independent."""
    frame = pd.DataFrame({"value": np.asarray(values, dtype=float), "cluster": list(clusters)})
    return frame.groupby("cluster", sort=False)["value"].mean().to_numpy()


def judge(effects: Sequence[Effect]) -> list[str]:
    """Verdicts for one notebook's family of tests, Holm-adjusted: confirmed / refuted when the adjusted
    test rejects on the paper's / the other side, else inconclusive (also for fewer than 2 units)."""
    testable = [i for i, e in enumerate(effects) if not math.isnan(e.p_value)]
    verdicts = ["inconclusive"] * len(effects)
    if testable:
        reject = multipletests([effects[i].p_value for i in testable], alpha=ALPHA, method="holm")[0]
        for i, rejected in zip(testable, reject):
            if rejected:
                verdicts[i] = "confirmed" if effects[i].on_papers_side else "refuted"
    return verdicts


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim tested on several networks (see the module docstring)."""
    tested = [v for v in verdicts if v != "not testable here"]
    if not tested:
        return "not testable here"
    unknown = sorted(set(tested) - {"confirmed", "refuted", "inconclusive"})
    if unknown:
        raise ValueError(f"combine takes per-network verdicts, not {unknown}")
    kinds = set(tested)
    if len(kinds) == 1:
        return tested[0]
    if {"confirmed", "refuted"} <= kinds:
        return "mixed"
    return "partly confirmed" if "confirmed" in kinds else "partly refuted"


def mean_std(values: Iterable[float], digits: int = 2) -> str:
    """'m ± s SD (n=k)' for a list of per-seed values (`mean_spread` with the SD)."""
    return mean_spread(values, "SD", digits)


def directional_verdict(
    treatment: Sequence[float],
    control: Sequence[float],
    *,
    direction: str = "higher",
    min_seeds: int = 3,
    min_relative_effect: float = 0.05,
) -> str:
    """The older rule, kept until every paper judges through `judge`.

    Rule [I]: with at least `min_seeds` paired seeds, take the per-seed differences in the claimed
    direction. 'refuted' when their mean is below minus its standard error; otherwise 'confirmed' when
    it exceeds its standard error and is at least `min_relative_effect` of the control's mean magnitude;
    'not confirmed' when it is beyond the noise but smaller than that (a consistent but negligible
    effect); else 'inconclusive'. Fewer seeds give 'inconclusive' whatever the means say.
    """
    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    if t.shape != c.shape or t.size == 0:
        raise ValueError(f"need paired per-seed values, got {t.size} treatment and {c.size} control values")
    if direction not in DIRECTIONS:
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

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
- A notebook's tests form one family (or, declared in advance, one family per claim: `judge_tests(...,
  family=by_claim)`, which bounds the chance of a false verdict per claim rather than per notebook):
  `judge` adjusts their p-values by Holm's method and calls a claim
  confirmed when the adjusted test rejects on the paper's side, refuted when it rejects on the other
  side, and inconclusive otherwise, reported with the minimal detectable effect at 80% power for the
  n used (statsmodels) at the level the family asks of it: with r of the family's m tests rejected, a
  further rejection needs p <= 0.05 / (m - r) (Holm's next step), so the MDE is computed there, not at
  0.05. A claim the setting cannot test is "not testable here", with the reason.
- An effect chosen as the largest of several candidates (e.g. the deepest dip over layer pairs) is
  corrected for that search: `bound_effect(..., searched=k)` gives a Bonferroni p-value (k x p) and a
  1 - 0.05/k interval before the notebook's Holm rule.
- A claim that needs several conditions on one network (e.g. accuracy kept and few units kept) holds
  on it when every condition is confirmed and fails when one is refuted (`conjunction`).
- Several networks: `combine` gives one word for the claim (confirmed / refuted only when every
  network agrees; partly confirmed / partly refuted when the others are inconclusive; mixed when some
  confirm and some refute).
- Every ± names its spread: `mean_spread(values, "SD")` or `"SE"`.

A method's claims module builds one `ClaimTest` per (claim, network, condition), judges them together
with `judge_tests` (one Holm family per notebook unless it declares per-claim families) and words each network's outcome with `Judged.text`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from replication import io

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
VERDICTS = ("confirmed", "refuted", "inconclusive", "not testable here",
            "partly confirmed", "partly refuted", "mixed")
ALPHA = 0.05
POWER = 0.8
DIRECTIONS = ("higher", "lower")
IDENTICAL_RTOL = 1e-9  # values this close are identical units (float rounding), not a spread to test
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
    """One row of a claims table. `paper` and `ours` are short human-readable strings; `unit` the unit
    of replication and its n (e.g. "training seeds, n=3 per network"); `seeds` the seeds behind the row."""

    claim_id: str
    claim: str
    paper: str
    ours: str
    verdict: str
    note: str = ""
    unit: str = ""
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
    `direction` is the paper's side: "higher" (mean > bound) or "lower" (mean < bound). `searched`:
    how many candidates the effect was chosen from (interval, p-value and MDE corrected for them).
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
    searched: int = 1

    @property
    def on_papers_side(self) -> bool:
        return self.mean > self.bound if self.direction == "higher" else self.mean < self.bound

    def describe(self, digits: int = 2) -> str:
        """'mean [low, high] 95% CI, SD s, n=k units' for the claims table (the level says when the
        interval is corrected for a search over several candidates)."""
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n={self.n} {self.unit}: no interval)"
        level = "95% CI" if self.searched == 1 else f"{100 * (1 - ALPHA / self.searched):.4g}% CI (best of {self.searched})"
        return (f"{self.mean:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}] {level}, "
                f"SD {self.sd:.{digits}f}, n={self.n} {self.unit}")


def bound_effect(values: Sequence[float], *, unit: str, bound: float = 0.0, direction: str = "higher",
                 searched: int = 1) -> Effect:
    """The effect of per-unit `values` against `bound` (0 for a paired difference, or a stated tolerance).

    `searched` > 1: the values were chosen as the best of that many candidates; the p-value is
    Bonferroni's (searched x p, at most 1) and interval and MDE use the level 0.05 / searched.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if searched < 1:
        raise ValueError(f"searched = {searched}: the number of candidates searched is at least 1")
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"need one finite value per {unit or 'unit'}, got {x.tolist()}")
    n, mean = int(x.size), float(x.mean())
    if n < 2:
        return Effect(mean, math.nan, math.nan, math.nan, n, unit, bound, direction, math.nan, math.nan, searched)
    if np.allclose(x, mean, rtol=IDENTICAL_RTOL, atol=0):  # identical units (to rounding): the sign decides
        p_value = 1.0 if math.isclose(mean, bound, rel_tol=IDENTICAL_RTOL) else 0.0
        return Effect(mean, mean, mean, 0.0, n, unit, bound, direction, p_value, 0.0, searched)
    sd = float(x.std(ddof=1))
    alpha = ALPHA / searched
    low, high = stats.t.interval(1 - alpha, df=n - 1, loc=mean, scale=sd / math.sqrt(n))
    p_value = min(1.0, searched * float(stats.ttest_1samp(x, popmean=bound).pvalue))
    return Effect(mean, float(low), float(high), sd, n, unit, bound, direction, p_value,
                  minimal_detectable_effect(n, sd, alpha), searched)


def minimal_detectable_effect(n: int, sd: float, alpha: float) -> float:
    """The smallest |mean - bound| a two-sided one-sample t-test at level `alpha` detects with 80% power
    on n units of this SD (statsmodels' power solver); NaN below 2 units."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return float(TTestPower().solve_power(nobs=n, alpha=alpha, power=POWER, alternative="two-sided")) * sd


def paired_effect(treatment: Sequence[float], control: Sequence[float], *, unit: str, direction: str = "higher",
                  margin: float = 0.0, searched: int = 1) -> Effect:
    """The effect of treatment - control over paired units (e.g. seeds), against `margin` (0: any difference)."""
    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    if t.shape != c.shape:
        raise ValueError(f"need paired values per {unit or 'unit'}, got {t.size} treatment and {c.size} control values")
    return bound_effect(t - c, unit=unit, bound=margin, direction=direction, searched=searched)


def cluster_means(values: Sequence[float], clusters: Sequence[Any]) -> np.ndarray:
    """One mean per cluster (e.g. per class), in first-seen order: the unit when images are not independent."""
    frame = pd.DataFrame({"value": np.asarray(values, dtype=float), "cluster": list(clusters)})
    return frame.groupby("cluster", sort=False)["value"].mean().to_numpy()


def holm_p_values(effects: Sequence[Effect]) -> list[float]:
    """Holm-adjusted p-values of one notebook's family of tests (NaN where an effect has no test)."""
    testable = [i for i, e in enumerate(effects) if not math.isnan(e.p_value)]
    adjusted = [math.nan] * len(effects)
    if testable:
        values = multipletests([effects[i].p_value for i in testable], alpha=ALPHA, method="holm")[1]
        for i, value in zip(testable, values):
            adjusted[i] = float(value)
    return adjusted


def judge(effects: Sequence[Effect]) -> list[str]:
    """Verdicts for one notebook's family of tests, Holm-adjusted: confirmed / refuted when the adjusted
    test rejects on the paper's / the other side, else inconclusive (also for fewer than 2 units)."""
    return [_verdict(e, p) for e, p in zip(effects, holm_p_values(effects))]


def _verdict(effect: Effect, adjusted_p: float) -> str:
    if math.isnan(adjusted_p) or adjusted_p > ALPHA:
        return "inconclusive"
    return "confirmed" if effect.on_papers_side else "refuted"


@dataclass(frozen=True)
class ClaimTest:
    """One test of a claim: on `network` (or "" when the claim is not per network), one `condition`."""

    claim_id: str
    network: str
    effect: Effect
    condition: str = ""


@dataclass(frozen=True)
class Judged:
    """A `ClaimTest` with its Holm-adjusted p-value and verdict; `mde_level` is the level a rejection of
    this test would need in its family (Holm's next step, corrected for `searched`) and `mde` the
    minimal detectable effect there (NaN when untestable)."""

    test: ClaimTest
    p_holm: float
    verdict: str
    mde_level: float = math.nan
    mde: float = math.nan

    def text(self, digits: int = 2, detail: str = "") -> str:
        """'network condition: [detail] effect, p (Holm) -> verdict', with the MDE next to an inconclusive
        effect; `detail` (e.g. the two means compared) goes before the effect."""
        label = " ".join(part for part in (self.test.network, self.test.condition) if part)
        effect = self.test.effect
        words = detail + effect.describe(digits)
        if label:
            words = f"{label}: {words}"
        if not math.isnan(self.p_holm):
            words += f", p(Holm) {self.p_holm:.2g}"
        if self.verdict == "inconclusive" and not math.isnan(self.mde):
            words += f", MDE {self.mde:.{digits}f} at Holm's level {self.mde_level:.2g}"
        return f"{words} -> {self.verdict}"


def judge_tests(tests: Sequence[ClaimTest], *, family: Callable[[ClaimTest], Hashable] | None = None) -> list[Judged]:
    """Every test of one notebook judged by Holm's method (see the module docstring): as one family, or, when
    `family` maps each test to a key (e.g. its claim, `by_claim`), one family per key, declared before the
    data are seen and said in the notebook's decisions."""
    groups: dict[Hashable, list[int]] = {}
    for index, test in enumerate(tests):
        groups.setdefault(family(test) if family else None, []).append(index)
    judged: list[Judged | None] = [None] * len(tests)
    for members in groups.values():
        effects = [tests[i].effect for i in members]
        adjusted = holm_p_values(effects)
        verdicts = [_verdict(e, p) for e, p in zip(effects, adjusted)]
        testable = sum(not math.isnan(p) for p in adjusted)
        rejected = sum(v in ("confirmed", "refuted") for v in verdicts)
        for i, p, verdict in zip(members, adjusted, verdicts):
            effect = tests[i].effect
            level = ALPHA / (effect.searched * max(testable - rejected, 1)) if not math.isnan(p) else math.nan
            mde = minimal_detectable_effect(effect.n, effect.sd, level) if not math.isnan(p) else math.nan
            judged[i] = Judged(tests[i], p, verdict, level, mde)
    return judged


HOLM_FAMILIES = ("notebook", "claim")  # a notebook's Holm family choices (`holm_family`), its key being `family_key`


def family_key(holm_family: str) -> Callable[[ClaimTest], Hashable] | None:
    """`judge_tests`' `family` for a notebook's `holm_family` setting (ValueError for an unknown one)."""
    if holm_family not in HOLM_FAMILIES:
        raise ValueError(f"holm_family {holm_family!r} is not one of {HOLM_FAMILIES}.")
    return by_claim if holm_family == "claim" else None


def by_claim(test: ClaimTest) -> str:
    """The family key of per-claim Holm families (`judge_tests(..., family=by_claim)`)."""
    return test.claim_id


def conjunction(verdicts: Sequence[str]) -> str:
    """One network's verdict on a claim with several conditions: confirmed when every condition is,
    refuted when one is refuted, else inconclusive."""
    if not verdicts:
        raise ValueError("conjunction of no conditions")
    if "refuted" in verdicts:
        return "refuted"
    return "confirmed" if all(v == "confirmed" for v in verdicts) else "inconclusive"


def network_verdicts(judged: Sequence[Judged], claim_id: str) -> dict[str, str]:
    """Per network, the `conjunction` of the conditions of `claim_id` (networks in first-seen order)."""
    by_network: dict[str, list[str]] = {}
    for j in judged:
        if j.test.claim_id == claim_id:
            by_network.setdefault(j.test.network, []).append(j.verdict)
    return {network: conjunction(verdicts) for network, verdicts in by_network.items()}


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


def claims_table(rows: Iterable[ClaimResult]) -> pd.DataFrame:
    """A DataFrame with one row per claim, columns in reading order."""
    frame = pd.DataFrame([asdict(r) for r in rows])
    return frame[["claim_id", "claim", "paper", "ours", "verdict", "note", "unit", "seeds"]]


def write_claims(folder: str | Path, table: pd.DataFrame, *, paper: str, profile: str) -> Path:
    """Save a notebook's claims table (CSV) where the runner's summary will find it."""
    table = table.assign(paper_id=paper, profile=profile)
    return io.write_csv(Path(folder) / CLAIMS_FILE, table)

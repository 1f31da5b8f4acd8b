"""The paper's claims (METHOD.md 9) tested on the reproduce command's runs: one row per claim
with the paper's number, ours (mean ± std over seeds), the 95% confidence interval of the
difference, and a verdict.

Pure reporting, like eval/report.py: it reads the per-run numbers of results.json (written by
jobs/reproduce.py) and writes text. A claim compares two series of per-seed values: an arm's
over training seeds, or a reference model's (the anchor, a teacher) over sampling seeds. The
difference of their means gets Welch's t interval; the verdict reads only that interval:

- a gain ("DanceOPD beats X"): confirmed when the interval lies above 0, refuted when it lies
  below 0, inconclusive when it holds 0. Only the direction is tested; the paper's percentage
  is on other benchmarks and models, and ours is printed beside it;
- an equivalence ("within 0.1% of the anchor"): confirmed when the interval's lower end is above
  -margin (ours is not worse by more than the margin), refuted when its upper end is below
  -margin, inconclusive otherwise;
- a cost ("at a fraction of the time"): a gain on seconds per training step, lower is better.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from danceopd_jax.eval.report import markdown_table, mean_std

# What a claim may compare: its path in a run's (or reference model's) per-seed ShapesBench
# scores, or the run's own measured cost ("step_s", from its metrics.jsonl).
METRICS = {"edit": ("edit", "mean", "correct"), "t2i": ("t2i", "mean"), "step_s": ("step_s",)}
METRIC_NAMES = {"edit": "GEdit correct", "t2i": "GenEval mean", "step_s": "s / step"}
KINDS = ("gain", "within", "cost")


@dataclass(frozen=True)
class Claim:
    """One claim of the paper as a comparison of two rows of one experiment.

    `ours` and each of `against` name an arm (its label) or a reference model (its name in
    the experiment's reference scores, e.g. "anchor@cfg3.5"); with several `against`, the
    strongest one on the metric is the comparison (the paper's "best baseline")."""

    text: str
    paper: str  # the paper's number, as it states it
    experiment: str
    ours: str
    against: tuple[str, ...]
    metric: str  # a key of METRICS
    kind: str = "gain"  # one of KINDS
    margin: float = 0.0  # "within": the allowed shortfall, relative to against's mean

    def __post_init__(self):
        if self.metric not in METRICS or self.kind not in KINDS:
            raise ValueError(f"claim {self.text!r}: metric {self.metric!r} must be one of "
                             f"{list(METRICS)} and kind {self.kind!r} one of {list(KINDS)}.")


@dataclass(frozen=True)
class Interval:
    """The difference of two means (ours - against) and its 95% Welch interval (None when a
    side has a single value or no spread: no interval can be formed)."""

    diff: float
    low: float | None
    high: float | None


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return Interval(diff, None, None)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Interval(diff, None, None)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return Interval(diff, diff - half, diff + half)


def series(exp: Mapping, name: str, steps: str, metric: str) -> list[float]:
    """Per-seed values of `metric` for arm or reference model `name` at `steps` sampling
    steps; [] when it was not run or not measured."""
    if name in exp["arms"]:
        rows = [r if metric == "step_s" else r["scores"][steps] for r in exp["arms"][name].values()]
    else:
        model = exp["reference"]["models"].get(steps, {}).get(name)
        rows = list(model["per_seed"].values()) if model and metric != "step_s" else []
    out = []
    for row in rows:
        for key in METRICS[metric]:
            row = row.get(key) if isinstance(row, Mapping) else None
        if row is not None:
            out.append(float(row))
    return out


def verdict(claim: Claim, interval: Interval, reference: float) -> tuple[str, str]:
    """(confirmed | refuted | inconclusive, why) from the interval of ours - against."""
    if interval.low is None:
        return "inconclusive", "no interval: a side has one seed or no spread"
    low, high = interval.low, interval.high
    span = f"95% interval of the difference [{low:+.3f}, {high:+.3f}]"
    if claim.kind == "within":
        bound = -claim.margin * abs(reference)
        if low > bound:
            return "confirmed", f"{span} lies above -{claim.margin:.1%} of the reference"
        if high < bound:
            return "refuted", f"{span} lies below -{claim.margin:.1%} of the reference"
        return "inconclusive", f"{span} reaches below -{claim.margin:.1%} of the reference"
    better = (low > 0, high < 0) if claim.kind == "gain" else (high < 0, low > 0)
    if better[0]:
        return "confirmed", span
    if better[1]:
        return "refuted", f"{span}: the other way"
    return "inconclusive", f"{span} holds 0"


def claim_row(results: Mapping, claim: Claim) -> list[str]:
    """The claim's table row: claim, paper, ours vs against, relative difference, interval,
    verdict and why."""
    steps = str(results["sample_steps"][0])
    exp = results["experiments"].get(claim.experiment)
    name = METRIC_NAMES[claim.metric]
    if exp is None:
        return [claim.text, claim.paper, "-", "-", "-", "not run",
                f"experiment {claim.experiment!r} is not in this results.json"]
    ours = series(exp, claim.ours, steps, claim.metric)
    candidates = {a: series(exp, a, steps, claim.metric) for a in claim.against}
    candidates = {a: v for a, v in candidates.items() if v}
    if not ours or not candidates:
        missing = [n for n in (claim.ours, *claim.against)
                   if not series(exp, n, steps, claim.metric)]
        return [claim.text, claim.paper, "-", "-", "-", "not run",
                f"no {name} for {', '.join(missing)}"]
    pick = min if claim.kind == "cost" else max
    other = pick(candidates, key=lambda a: np.mean(candidates[a]))
    theirs = candidates[other]
    interval = welch_interval(ours, theirs)
    mine, their = mean_std(ours), mean_std(theirs)
    relative = f"{interval.diff / their[0]:+.1%}" if their[0] else "-"
    ci = "-" if interval.low is None else f"[{interval.low:+.3f}, {interval.high:+.3f}]"
    word, why = verdict(claim, interval, their[0])
    return [claim.text, claim.paper,
            f"{claim.ours} {mine[0]:.3f} ± {mine[1]:.3f} (n={len(ours)}) vs {other} "
            f"{their[0]:.3f} ± {their[1]:.3f} (n={len(theirs)}), {name}",
            relative, ci, f"**{word}**", why]


def claims_table(results: Mapping, claims: Sequence[Claim]) -> str:
    return markdown_table(["claim (METHOD.md 9)", "paper", "ours (mean ± std over seeds)",
                           "ours, relative", "95% CI of the difference", "verdict", "why"],
                          [claim_row(results, c) for c in claims])


def claims_section(results: Mapping, claims: Sequence[Claim]) -> str:
    """The report's section: how to read the verdicts, then the table."""
    return "\n\n".join([
        "## The paper's claims, tested",
        f"{results['seeds']} training seeds per arm, {results['sample_steps'][0]} sampling "
        "steps. Welch's 95% interval of the difference of the means (ours minus the "
        "comparison); a gain is confirmed when the interval lies above 0 and refuted when it "
        "lies below; an equivalence (\"within\") is confirmed when the interval's lower end is "
        "above minus the margin; a cost is a gain on seconds per step, lower being better. "
        "Only directions are tested: the paper's percentages are on other benchmarks. The "
        "rules: danceopd_jax/eval/claims.py.",
        claims_table(results, claims)])

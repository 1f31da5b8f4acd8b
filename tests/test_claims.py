"""The claims table (eval/claims.py): Welch's interval of the difference, the verdict rules,
the strongest baseline as the comparison, and rows that could not be computed."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from danceopd_jax.eval.claims import Claim, claim_row, claims_table, welch_interval


def _results(arms: dict[str, list[float]], reference: dict[str, list[float]]) -> dict:
    """A results.json with one experiment: per-seed GEdit correct and GenEval mean of each
    arm (training seeds) and reference model (sampling seeds), and each arm's s / step."""
    def scores(v: float) -> dict:
        return {"edit": {"mean": {"correct": v}}, "t2i": {"mean": v}}

    return {"sample_steps": [16], "experiments": {"e": {
        "arms": {label: {str(i): {"scores": {"16": scores(v)}, "step_s": 1.0 + v}
                         for i, v in enumerate(values)} for label, values in arms.items()},
        "reference": {"models": {"16": {name: {"per_seed": {str(i): scores(v)
                                                              for i, v in enumerate(values)}}
                                        for name, values in reference.items()}}}}}}


def test_welch_interval_is_scipys():
    a, b = [0.80, 0.83, 0.78], [0.60, 0.66, 0.61, 0.64]
    ours = welch_interval(a, b)
    theirs = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert ours.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert (ours.low, ours.high) == pytest.approx((theirs.low, theirs.high))
    assert welch_interval([0.5], b).low is None  # one seed: no interval
    assert welch_interval([0.5, 0.5], [0.4, 0.4]).low is None  # no spread


@pytest.mark.parametrize("ours, verdict", [([0.80, 0.82, 0.81], "confirmed"),
                                           ([0.40, 0.42, 0.41], "refuted"),
                                           ([0.50, 0.70, 0.62], "inconclusive")])
def test_a_gain_is_judged_against_the_strongest_baseline(ours, verdict):
    results = _results({"D": ours, "weak": [0.20, 0.21, 0.22], "strong": [0.60, 0.61, 0.62]},
                       {})
    row = claim_row(results, Claim("D wins", "+8%", "e", "D", ("weak", "strong"), "edit"))
    assert "vs strong 0.610" in row[2] and row[5] == f"**{verdict}**", row
    low, high = (float(x) for x in row[4].strip("[]").split(","))
    interval = welch_interval(ours, [0.60, 0.61, 0.62])
    assert (low, high) == pytest.approx((interval.low, interval.high), abs=5e-4)


def test_within_compares_to_a_reference_model_and_cost_prefers_the_cheaper():
    results = _results({"D": [0.500, 0.501, 0.499], "worse": [0.40, 0.41, 0.39]},
                       {"anchor": [0.500, 0.502, 0.498]})

    def judge(claim: Claim) -> str:
        return claim_row(results, claim)[5]

    assert judge(Claim("kept", "0.1%", "e", "D", ("anchor",), "t2i", "within", 0.02)) \
        == "**confirmed**"
    assert judge(Claim("kept", "0.1%", "e", "worse", ("anchor",), "t2i", "within", 0.02)) \
        == "**refuted**"
    # A 0.1% margin is finer than the seeds' spread: the interval cannot settle it.
    assert judge(Claim("kept", "0.1%", "e", "D", ("anchor",), "t2i", "within", 0.001)) \
        == "**inconclusive**"
    # s / step: "worse" (1.4 s) is cheaper than D (1.5 s); lower is better for a cost.
    assert judge(Claim("cheap", "less", "e", "worse", ("D",), "step_s", "cost")) \
        == "**confirmed**"
    assert judge(Claim("cheap", "less", "e", "D", ("worse",), "step_s", "cost")) \
        == "**refuted**"


def test_rows_that_cannot_be_computed_say_why():
    results = _results({"D": [0.5, 0.6]}, {})
    row = claim_row(results, Claim("x", "+1%", "e", "D", ("missing",), "edit"))
    assert row[5] == "not run" and "missing" in row[6]
    row = claim_row(results, Claim("x", "+1%", "other", "D", ("D",), "edit"))
    assert row[5] == "not run" and "'other'" in row[6]
    assert claims_table(results, [Claim("x", "+1%", "e", "D", ("missing",), "edit")]).count(
        "\n") == 2
    with pytest.raises(ValueError, match="metric 'fid'"):
        Claim("x", "+1%", "e", "D", ("D",), "fid")

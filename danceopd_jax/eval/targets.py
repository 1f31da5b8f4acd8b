"""The main job's targets (config.eval.targets) and the table it prints at the end.

A target compares one ShapesBench score of the student with the same score of a reference
model (the anchor or a teacher), both as means over the sampling seeds:
- rule "within": the student is at least the reference's score minus `value`
  (T2I kept: "within 0.02 of the anchor"; a student above its reference passes);
- rule "ratio": the student is at least `value` times the reference's score
  (edits acquired: ">= 0.90 x the edit teacher").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from danceopd_jax.config import TARGET_RULES, TARGET_SCORES

# Target score -> (task, path into a ShapesBench summary of that task) and its printed name.
PATHS = {"t2i": ("mean",), "edit": ("mean", "correct"), "edit_local": ("local", "correct"),
         "edit_global": ("global", "correct")}
SCORES = {name: (task, PATHS[name]) for name, task in TARGET_SCORES.items()}
SCORE_NAMES = {"t2i": "GenEval-style mean", "edit": "GEdit-style correct",
               "edit_local": "GEdit-style correct, local", "edit_global":
               "GEdit-style correct, global"}
RULES = TARGET_RULES
STUDENT = "student"


def score_of(model: Mapping[str, Any], score: str) -> float | None:
    """A model's mean over seeds of `score` in a ShapesBench report; None if not scored."""
    task, path = SCORES[score]
    node = model.get(task)
    if node is None:
        return None
    for key in path:
        node = node[key]
    return float(node["mean"])


def describe(target: Mapping[str, Any]) -> str:
    """The target in words, e.g. "GenEval-style mean >= anchor's - 0.02"."""
    name, ref, value = SCORE_NAMES[target["score"]], target["reference"], target["value"]
    if target["rule"] == "within":
        return f"{name} >= {ref}'s - {value:g}"
    return f"{name} >= {value:g} x {ref}'s"


def check(report: Mapping[str, Any], targets: Mapping[str, Mapping[str, Any]]) -> dict:
    """{target name: the target, the student's and the reference's scores, the threshold,
    the margin (student - threshold) and "met"} for a ShapesBench report's models."""
    models = report["models"]
    out = {}
    for name, t in targets.items():
        student = score_of(models[STUDENT], t["score"])
        reference = score_of(models[t["reference"]], t["score"])
        if student is None or reference is None:
            raise ValueError(f"target {name!r} compares {t['score']!r} scores, but the report "
                             f"has none for {STUDENT if student is None else t['reference']!r}; "
                             "score that model on that task (worlds/shapes.py score_jobs).")
        threshold = reference - t["value"] if t["rule"] == "within" else reference * t["value"]
        out[name] = {**dict(t), "description": describe(t), "student_score": student,
                     "reference_score": reference, "threshold": threshold,
                     "margin": student - threshold, "met": bool(student >= threshold)}
    return out


def summary(report: Mapping[str, Any], verdicts: Mapping[str, Mapping[str, Any]],
            split_edits: bool) -> str:
    """The main job's printout: one row per model (GenEval-style mean, GEdit-style correct and,
    with `split_edits`, its local and global parts), then each target met or not met."""
    scores: Sequence[str] = ["t2i", "edit", *(["edit_local", "edit_global"] if split_edits
                                              else [])]
    head = ["model", *(SCORE_NAMES[s] for s in scores)]
    lines = [f"ShapesBench, {report['split']} split, {report['sample_steps']} sampling steps, "
             f"{report['num_per_category']} prompts / edits per category, seeds "
             f"{', '.join(map(str, report['seeds']))} (means over the seeds)", "",
             _row(head), _row(["---"] * len(head))]
    for model, m in report["models"].items():
        cells = [score_of(m, s) for s in scores]
        lines.append(_row([model, *("" if c is None else f"{c:.3f}" for c in cells)]))
    if verdicts:
        lines += ["", _row(["target (student)", "student", "needed", "margin", "verdict"]),
                  _row(["---"] * 5)]
        for name, v in verdicts.items():
            lines.append(_row([f"{name}: {v['description']}", f"{v['student_score']:.3f}",
                               f">= {v['threshold']:.3f}", f"{v['margin']:+.3f}",
                               "met" if v["met"] else "NOT met"]))
    return "\n".join(lines)



def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"

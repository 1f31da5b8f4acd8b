"""The table of launch/student_sweep.sh: python launch/sweep_table.py DIR (one workdir per
variant, each with the ShapesBench scores.json of the main job and curve.jsonl)."""

import json
import sys
from pathlib import Path


def row(workdir: Path) -> str:
    curve_path = workdir / "curve.jsonl"
    curve = [json.loads(line) for line in curve_path.read_text().splitlines()] if (
        curve_path.exists()) else []
    points = " ".join(f"{p['step']}:{p['edit']:.2f}" for p in curve)
    if not (workdir / "scores.json").exists():
        return f"| {workdir.name} | unfinished | | | | {points} |"
    scores = json.loads((workdir / "scores.json").read_text())
    student = scores["models"]["student"]
    edit = student["edit"]["mean"]["correct"]["mean"] if "edit" in student else None
    verdicts = ", ".join(f"{name} {'met' if v['met'] else 'NOT met'} ({v['margin']:+.3f})"
                         for name, v in scores["targets"].items())
    return (f"| {workdir.name} | {student['t2i']['mean']['mean']:.3f} | "
            f"{'' if edit is None else f'{edit:.3f}'} | {verdicts} | "
            f"{scores['wall_time_s']['distill']:.0f} | {points} |")


def main(root: str) -> None:
    print("| variant | student GenEval-style mean | student GEdit-style correct "
          "| targets (margin) | distill s | curve edit (step:score) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for workdir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        print(row(workdir))


if __name__ == "__main__":
    main(sys.argv[1])

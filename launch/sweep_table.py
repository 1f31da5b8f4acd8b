"""The table of launch/student_sweep.sh: python launch/sweep_table.py DIR (one workdir per
variant, each with scores.json and curve.jsonl)."""

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
    teacher = scores["joint_edit"]["joint_edit@cfg1"]["score"]
    student = scores["student"]
    edit = student["joint_edit@cfg1"]["score"]
    return (f"| {workdir.name} | {student['t2i@cfg1']['score']:.3f} | {edit:.3f} | "
            f"{edit / teacher:.0%} | {scores['wall_time_s']['distill']:.0f} | {points} |")


def main(root: str) -> None:
    print("| variant | student T2I | student edits | of teacher | distill s "
          "| curve edit (step:score) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for workdir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        print(row(workdir))


if __name__ == "__main__":
    main(sys.argv[1])

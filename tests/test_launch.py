"""launch/anchor_sweep.sh at a tiny size: the script a GPU session runs blind in its one device
call (train each candidate anchor, score it, read it with benchmarks/relation_probe.py, report,
and send the best one back in parts) must work before that call is spent on it."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, TINY

# A tiny candidate: the world and model shrunk, 3 training steps (its overrides reach every
# command, the probe's too, as a real candidate's model overrides do).
_TINY_WORLD_MODEL = {k: v for k, v in TINY.items() if k.split(".")[0] in ("world", "model")}
VARIANT = ",".join([*(f"{k}={v}" for k, v in _TINY_WORLD_MODEL.items()),
                    "teachers.anchor.steps=3", "teachers.anchor.batch_size=8"])
# The scoring kept small for every anchor (the shipped one is scored at its own size).
EXTRA = "--config.eval.num=1 --config.eval.seeds=0 --config.eval.sample_steps=2"


def sweep(workdir: Path, out: Path) -> subprocess.CompletedProcess:
    """The script run as on the device machine, where danceopd_jax is not installed: its
    `python3` sees the installed dependencies but not this package, even where it is installed
    (an editable install, as CI's, is a .pth file, which `python -S` does not read). So the
    script must put the checkout on the path itself."""
    bin_dir = workdir.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python3.chmod(0o755)
    env = {**os.environ, "WORKDIR": str(workdir), "OUT": str(out), "EXTRA": EXTRA,
           "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]]),
           "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    return subprocess.run(["bash", "launch/anchor_sweep.sh", VARIANT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_anchor_sweep_trains_scores_probes_and_returns_the_best(tmp_path):
    workdir, out = tmp_path / "sweep", tmp_path / "out"
    out.mkdir()
    run = sweep(workdir, out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "teacher:anchor" in run.stderr  # trained (its progress bar); the rerun below is not
    name = VARIANT.replace("=", "_").replace(",", "_")
    # The report: the shipped anchor and the candidate, each against the base's target.
    table = (out / "sweep.md").read_text()
    assert "| shipped |" in table and f"| {VARIANT} |" in table
    assert (workdir / "sweep.md").read_text() == table
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores) == {"shipped", VARIANT}
    assert 0.0 <= scores[VARIANT]["models"]["anchor"]["t2i"]["mean"]["mean"] <= 1.0
    # The probe read the candidate with its own model: both relations and the named cells.
    probe = (workdir / name / "relation_probe.txt").read_text()
    assert probe.count("reads ") == 2 and probe.count("named cell") == 4
    assert "reads 'above' vs 'below'" in table
    # The best candidate comes back as parts that reassemble into teachers/t2i_anchor.
    parts = sorted(out.glob("best_anchor.tgz.part-*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    joined = tmp_path / "best.tgz"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        tar.extractall(tmp_path / "teachers", filter="data")
    assert (tmp_path / "teachers" / "t2i_anchor.variant.txt").read_text().strip() == VARIANT
    recipe = json.loads((tmp_path / "teachers" / "t2i_anchor" / "recipe.json").read_text())
    assert recipe["key"]["model"]["width"] == TINY["model.width"]
    # Run again, it trains nothing: each finished anchor is reused and scored again.
    again = sweep(workdir, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher:anchor" not in again.stderr
    assert (out / "sweep.md").read_text() == table

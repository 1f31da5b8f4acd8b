"""The reproduce command's machinery (jobs/reproduce.py, eval/report.py) on a tiny case."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import ROOT

from danceopd_jax.config import apply_overrides, validate
from danceopd_jax.core.methods import dsigma_weights
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.eval import report
from danceopd_jax.jobs import reproduce as ex

SMOKE = ex.PRESETS["smoke"]


def test_mean_std_and_cells():
    assert report.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std over seeds
    assert report.mean_std([0.5]) == (0.5, 0.0)
    assert report.cell([0.25, 0.75]) == "0.500 ± 0.354"
    assert report.cell([]) == "-"
    with pytest.raises(ValueError, match="finite"):
        report.mean_std([1.0, float("nan")])


def test_apply_overrides_rejects_unknown_fields():
    config = ex.load_config_file(ROOT / "configs" / "t2i_edit.py")
    apply_overrides(config, {"training.steps": 7, "danceopd.query_k": lambda c: 2})
    assert config.training.steps == 7 and config.danceopd.query_k == 2
    with pytest.raises(KeyError, match="traning"):
        apply_overrides(config, {"training.traning_steps": 1})


def test_run_config_keeps_teachers_and_sets_the_training_seed():
    t2i_edit = next(e for e in ex.EXPERIMENTS if e.name == "t2i_edit")
    flow = next(a for a in t2i_edit.arms if a.label == "Flow-OPD")
    a = ex.run_config(t2i_edit, t2i_edit.arms[0], ex.PRESETS["cpu"], 0, ROOT / "configs")
    b = ex.run_config(t2i_edit, flow, ex.PRESETS["cpu"], 2, ROOT / "configs")
    assert (a.seed, b.seed, a.training.seed, b.training.seed) == (0, 0, 0, 2)
    assert a.teachers.to_dict() == b.teachers.to_dict()  # so both reuse the shipped teachers
    # Flow-OPD rolls each prompt out G times: B / G prompts keep the rollouts per step equal.
    assert b.training.batch_size * b.baselines.group == a.training.batch_size
    # The paper's student (config.paper_student) and Flow-OPD, as the reference's, start from
    # the teachers' merge; Flow-OPD does so on a config whose student starts from the anchor too.
    assert (a.training.init, b.training.init) == ("merge", "merge")
    budget = ex.load_config_file(ROOT / "configs" / "t2i_edit_budget.py")
    assert budget.training.init == "anchor"
    assert apply_overrides(budget, flow.overrides).training.init == "merge"
    assert ex.run_id(a) != ex.run_id(b)
    fusion = next(e for e in ex.EXPERIMENTS if e.name == "edit_fusion")
    c = ex.run_config(fusion, fusion.arms[0], ex.PRESETS["cpu"], 0, ROOT / "configs")
    shipped = ex.load_config_file(ROOT / "configs" / "edit_fusion.py")
    assert c.teachers.to_dict() == shipped.teachers.to_dict()  # the shipped local / global
    # Every run of every preset is a valid config, the budget recipes' too.
    for experiment in (*ex.EXPERIMENTS, *ex.EXTRA_EXPERIMENTS):
        for arm in experiment.arms:
            for preset in ex.PRESETS.values():
                validate(ex.run_config(experiment, arm, preset, 0, ROOT / "configs"))


@pytest.mark.parametrize("name", ["t2i_edit", "edit_fusion"])
def test_the_fusion_experiments_compare_both_dsigma_weightings_on_the_papers_schedule(name):
    """DiffusionOPD's "uniform" and "true" dsigma weightings are one objective on an unshifted
    schedule; the fusion experiments run on the paper's shift 3 (config.paper_student), where
    they differ, every arm alike."""
    experiment = next(e for e in ex.EXPERIMENTS if e.name == name)
    configs = [ex.run_config(experiment, a, ex.PRESETS["cpu"], 0, ROOT / "configs")
               for a in experiment.arms]
    assert {c.danceopd.shift for c in configs} == {3.0}
    weightings = sorted(c.baselines.dsigma for c in configs if c.method == "diffusion_opd")
    assert weightings == ["true", "uniform"]
    d = configs[0].danceopd
    sigmas = make_sigmas(d.num_steps, d.shift, d.schedule)
    assert not np.allclose(dsigma_weights(sigmas, "true"), dsigma_weights(sigmas, "uniform"))


@pytest.mark.slow
def test_reproduction_runs_scores_reports_and_resumes(trained, tmp_path, monkeypatch):
    """Two arms x two seeds of the T2I + Edit experiment at the smoke size: every run is
    trained and scored, the tables hold mean ± std of the per-seed numbers, the figures are
    written, and a second invocation reuses every finished run."""
    arms = (ex.Arm("DanceOPD"), ex.Arm("Weight merging", {"method": "weight_merge"}))
    experiment = ex.Experiment("t2i_edit", "T2I + Edit", "t2i_edit", arms)
    reproduction = ex.Reproduction(SMOKE, tmp_path / "out", ROOT / "configs", (experiment,))
    # The smoke preset's teachers have the tiny fixture's recipes: reuse them.
    shutil.copytree(trained[0] / "teachers", reproduction.shared(experiment) / "teachers")
    results = reproduction.run_all()

    exp = results["experiments"]["t2i_edit"]
    runs = exp["arms"]["DanceOPD"]
    assert set(runs) == {"0", "1"}
    steps = str(SMOKE.sample_steps[0])
    # The per-run JSON each run wrote in its own workdir, read back from disk: the report's
    # numbers must be computed from these, not from the dict they were collected into.
    run_dir = tmp_path / "out" / "runs" / "t2i_edit"
    per_run = [json.loads((run_dir / r["workdir"].split("/")[-1] / "report.json").read_text())
               for r in runs.values()]
    edit = [r["scores"][steps]["edit"]["mean"]["correct"] for r in per_run]
    t2i = [r["scores"][steps]["t2i"]["mean"] for r in per_run]
    assert all("fd" in r["scores"][steps] for r in per_run)
    assert [row["step"] for row in runs["0"]["curve"]] == [0, 1, 2]
    assert set(exp["reference"]["models"][steps]) == {"anchor", "joint_edit"}

    md = tmp_path / "docs" / "results.md"
    reproduction.write_report(results, md, tmp_path / "docs" / "fig", "# Results")
    text = md.read_text()
    danceopd_rows = [line for line in text.splitlines() if line.startswith("| DanceOPD |")]
    assert any(report.cell(edit) in row for row in danceopd_rows), (report.cell(edit), text)
    assert any(report.cell(t2i) in row for row in danceopd_rows), (report.cell(t2i), text)
    assert "| Weight merging |" in text and "DanceOPD minus each method" in text
    for name in ("t2i_edit_edit.png", "t2i_edit_t2i.png", "t2i_edit_gallery.png",
                 "t2i_edit_curve_edit.png"):
        assert (tmp_path / "docs" / "fig" / name).stat().st_size > 0
    assert "](fig/t2i_edit_gallery.png)" in text
    assert json.loads((tmp_path / "docs" / "fig" / "results_smoke.json").read_text()) == results
    # The claims table, at the top, from the same per-run numbers (the anchor's are its
    # sampling seeds'); claims of experiments that were not run say so.
    assert text.index("## The paper's claims, tested") < text.index("## T2I + Edit")
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    kept = next(row for label, row in rows.items() if label.startswith("| T2I kept"))
    assert f"DanceOPD {report.mean_std(t2i)[0]:.3f} ± {report.mean_std(t2i)[1]:.3f} (n=2)" in kept
    query = next(row for label, row in rows.items() if label.startswith("| a low-noise"))
    assert "not run" in query

    # Rerunning reuses every finished run: nothing is trained again.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ex.distill, "run", no_training)
    again = ex.Reproduction(SMOKE, tmp_path / "out", ROOT / "configs", (experiment,)).run_all()
    assert again["experiments"]["t2i_edit"]["arms"] == exp["arms"]

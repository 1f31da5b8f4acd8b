"""ShapesBench: its GenEval- and GEditBench-style scores on exact and corrupted images, the
Frechet distance, the FD classifier's cache, the evaluate CLI and the training curve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, tiny_config

from danceopd_jax.core.errors import CheckpointError
from danceopd_jax.data.shapes.dataset import Splits
from danceopd_jax.data.shapes.prompts import CATEGORIES
from danceopd_jax.data.shapes.world import COLORS, PALETTE, Obj, Scene, cell_size, render
from danceopd_jax.data.store import digest
from danceopd_jax.eval import features as features_lib
from danceopd_jax.eval.features import ClassifierRecipe, scene_features
from danceopd_jax.eval.frechet import frechet_distance, frechet_distance_gaussians
from danceopd_jax.eval.shapes import judge
from danceopd_jax.eval.shapesbench import EDIT_NAMES, Job, eval_set, gedit, geneval, mean_std
from danceopd_jax.jobs import distill
from danceopd_jax.jobs.evaluate import evaluate_workdir, parse_model
from danceopd_jax.train.loop import every
from danceopd_jax.worlds.shapes import score_jobs, validate_edit_targets

SIZE = 24
NUM = 6  # per category
TINY_RECIPE = ClassifierRecipe(num_train=32, num_heldout=8, width=4, cell_features=2, steps=3,
                               batch_size=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Splits:
    return Splits(tiny_config(**{"world.image_size": SIZE}),
                         tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def t2i(world) -> dict[str, np.ndarray]:
    return eval_set(world, "heldout", "t2i", CATEGORIES, NUM)


@pytest.fixture(scope="module")
def edit(world) -> dict[str, np.ndarray]:
    return eval_set(world, "heldout", "joint_edit", tuple(EDIT_NAMES), NUM)


def _scenes(bucket: dict[str, np.ndarray], key: str) -> list[Scene]:
    return [Scene.from_dict(json.loads(str(s))[key]) for s in bucket["spec"]]


def _recolored(scene: Scene) -> np.ndarray:
    """Every object in the next palette colour that is neither its own nor the background."""
    def other(color: str) -> str:
        i = COLORS.index(color)
        return next(c for c in COLORS[i + 1:] + COLORS[:i] if c != scene.background)
    objects = tuple(Obj(o.shape, other(o.color), o.cell) for o in scene.objects)
    return render(Scene(scene.background, objects, scene.style), SIZE)


def _empty(scene: Scene) -> np.ndarray:
    return np.broadcast_to(np.array(PALETTE[scene.background], np.uint8), (SIZE, SIZE, 3))


def test_eval_sets_are_balanced_fixed_and_held_out(world, t2i, edit) -> None:
    assert list(t2i["task"]) == [c for c in CATEGORIES for _ in range(NUM)]
    assert list(edit["task"]) == [k for k in EDIT_NAMES for _ in range(NUM)]
    again = eval_set(world, "heldout", "t2i", CATEGORIES, NUM)
    assert all(np.array_equal(again[k], t2i[k]) for k in t2i)
    train = eval_set(world, "train", "t2i", CATEGORIES, NUM)
    assert not set(train["spec"]) & set(t2i["spec"])


def test_geneval_scores_ground_truth_fully_and_catches_corruptions(t2i) -> None:
    scenes = _scenes(t2i, "scene")
    perfect = {c: 1.0 for c in CATEGORIES}
    assert geneval(judge(t2i["target"], t2i)) == {**perfect, "mean": 1.0,
                                                  "object_count": perfect}
    wrong_color = geneval(judge(np.stack([_recolored(s) for s in scenes]), t2i))
    missing = geneval(judge(np.stack([_empty(s) for s in scenes]), t2i))
    assert wrong_color["mean"] == missing["mean"] == 0.0
    # Wrong colours, the right number of objects; no objects, never the right number.
    assert wrong_color["object_count"] == perfect
    assert missing["object_count"] == {c: 0.0 for c in CATEGORIES}
    # One cell to the right (wrapping around): every object is somewhere it was not asked to be.
    moved = geneval(judge(np.roll(t2i["target"], cell_size(SIZE), axis=2), t2i))
    assert moved["single_object"] == moved["two_objects"] == 0.0
    assert moved["counting"] == moved["colors"] == moved["color_attr"] == 1.0  # no position


def test_gedit_scores_ground_truth_fully_and_separates_changed_from_preserved(edit) -> None:
    perfect = gedit(judge(edit["target"], edit))
    assert set(perfect) == {*EDIT_NAMES, "mean", "local", "global", "by_style"}
    styles = {json.loads(str(s))["style"] for s in edit["spec"]} - {None}
    assert set(perfect["by_style"]) == styles and len(styles) > 1
    rows = [*perfect.pop("by_style").values(), *perfect.values()]
    assert all(r == {"changed": 1.0, "preserved": 1.0, "correct": 1.0} for r in rows)
    source = gedit(judge(edit["source"], edit))  # returning the source: nothing changed
    rows = [*source.pop("by_style").values(), *source.values()]
    assert all(r == {"changed": 0.0, "preserved": 1.0, "correct": 0.0} for r in rows)
    targets = _scenes(edit, "target")
    recolored = gedit(judge(np.stack([_recolored(s) for s in targets]), edit))
    for kind in ("add", "replace", "recolor", "background"):  # wrong colours, wherever they are
        assert recolored[kind]["correct"] == 0.0, kind
    # The edited cell right, the rest wrong: a new background is not preserving.
    rebg = [Scene(next(c for c in COLORS if c not in {s.background, *(o.color for o in
                                                                       s.objects)}), s.objects)
            for s in targets]
    local = gedit(judge(np.stack([render(s, SIZE) for s in rebg]), edit))
    for kind in ("add", "remove", "replace", "recolor", "local"):
        assert local[kind] == {"changed": 1.0, "preserved": 0.0, "correct": 0.0}, kind
    # 4 local categories at 0 and 2 global ones: the plain mean is a third of the global one
    assert local["mean"]["correct"] == pytest.approx(local["global"]["correct"] / 3)


def test_gedit_breaks_style_changes_down_by_style(edit) -> None:
    """Inverting nothing but drawing every other style right: the breakdown puts the whole
    loss on inversion, and the style-change score is the other styles' share of its rows."""
    styles = [json.loads(str(s))["style"] for s in edit["spec"]]
    inverted = np.array([s == "invert" for s in styles])
    images = np.where(inverted[:, None, None, None], edit["source"], edit["target"])
    scores = gedit(judge(images, edit))
    assert scores["by_style"]["invert"] == {"changed": 0.0, "preserved": 1.0, "correct": 0.0}
    assert all(r["correct"] == 1.0 for style, r in scores["by_style"].items() if style != "invert")
    styled = [s for s in styles if s]
    assert 0 < styled.count("invert") < len(styled)
    assert scores["style"]["correct"] == pytest.approx(1 - styled.count("invert") / len(styled))


def test_mean_std_over_seeds() -> None:
    out = mean_std([{"a": 1.0, "b": {"c": 2.0}}, {"a": 3.0, "b": {"c": 2.0}}])
    assert out == {"a": {"mean": 2.0, "std": 2**0.5}, "b": {"c": {"mean": 2.0, "std": 0.0}}}


def test_frechet_distance_hand_computed() -> None:
    # cov_a = diag(4, 1): its root is diag(2, 1), and root cov_b root = [[8, 2], [2, 2]] has
    # eigenvalues 5 +- sqrt(13), whose roots sum to sqrt(10 + 2 sqrt(12)).
    mu_a, mu_b = np.array([1.0, 2.0]), np.array([0.0, 0.0])
    cov_a, cov_b = np.diag([4.0, 1.0]), np.array([[2.0, 1.0], [1.0, 2.0]])
    want = 5.0 + 5.0 + 4.0 - 2.0 * np.sqrt(10.0 + 4.0 * np.sqrt(3.0))
    assert frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b) == pytest.approx(want, rel=1e-12)
    assert frechet_distance_gaussians(mu_b, cov_b, mu_a, cov_a) == pytest.approx(want, rel=1e-12)
    # Sets: identical -> 0 (despite round-off in the roots); shifted by c -> |c|^2.
    x = np.random.default_rng(0).normal(size=(200, 5)) @ np.random.default_rng(1).normal(
        size=(5, 5))
    assert abs(frechet_distance(x, x)) < 1e-8
    assert frechet_distance(x, x + np.array([3.0, 0, 0, 4.0, 0])) == pytest.approx(25.0)
    # Rank-deficient covariances (fewer samples than dims) still give a finite distance.
    assert np.isfinite(frechet_distance(x[:3], x[3:6]))
    with pytest.raises(ValueError, match="differ in dimension"):
        frechet_distance(x, x[:, :3])


def test_classifier_is_cached_and_reused(tmp_path: Path, monkeypatch) -> None:
    first = scene_features(12, 1234, tmp_path, TINY_RECIPE)
    (key_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert key_dir.name == digest(first.info["key"])
    assert first.info["key"]["recipe"]["num_train"] == TINY_RECIPE.num_train
    assert set(first.info["heldout_accuracy"]) == {"background", "style", "shape", "color",
                                                   "scene"}

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was trained again")

    monkeypatch.setattr(features_lib, "train_classifier", no_training)
    second = scene_features(12, 1234, tmp_path, TINY_RECIPE)
    assert second.info == json.loads((key_dir / "recipe.json").read_text())
    images = np.random.default_rng(0).integers(0, 256, (300, 12, 12, 3), dtype=np.uint8)
    got = second.features(images)
    assert got.shape == (300, 10 * TINY_RECIPE.cell_features)
    np.testing.assert_allclose(got, first.features(images), rtol=1e-6)
    with pytest.raises(AssertionError, match="trained again"):  # another recipe: another key
        scene_features(12, 1234, tmp_path, ClassifierRecipe(**{**TINY_RECIPE.__dict__,
                                                                "seed": 1}))


def test_model_specs_and_job_tasks() -> None:
    assert parse_model("student") == ("student", None)
    assert parse_model("anchor@cfg3.5") == ("anchor", 3.5)
    for bad in ("anchor@cfg", "anchor@cfgx", "@cfg2", "anchor@cfg0"):
        with pytest.raises(ValueError, match="NAME@cfgALPHA"):
            parse_model(bad)
    with pytest.raises(ValueError, match="subset"):
        Job("x", {}, tasks=("t2i", "video"))


def _report(scores: dict[str, dict]) -> dict:
    """A ShapesBench report holding only the means the targets read."""
    def model(t2i=None, edit=None, local=None, glob=None):
        m = {}
        if t2i is not None:
            m["t2i"] = {"mean": {"mean": t2i, "std": 0.0}}
        if edit is not None:
            m["edit"] = {k: {"correct": {"mean": v, "std": 0.0}}
                         for k, v in (("mean", edit), ("local", local), ("global", glob))}
        return m

    return {"split": "heldout", "sample_steps": 16, "num_per_category": 32, "seeds": [0, 1, 2],
            "models": {name: model(**s) for name, s in scores.items()}}


def test_targets_verdicts_and_the_printed_table() -> None:
    from danceopd_jax.config import target
    from danceopd_jax.eval import targets

    report = _report({"anchor": {"t2i": 0.90},
                      "local_edit": {"edit": 0.6, "local": 0.9, "glob": 0.1},
                      "student": {"t2i": 0.885, "edit": 0.5, "local": 0.80, "glob": 0.2}})
    wanted = {"t2i": target("t2i", "anchor", "within", 0.02),
              "local": target("edit_local", "local_edit", "ratio", 0.9),
              "edit": target("edit", "local_edit", "ratio", 0.9)}
    got = targets.check(report, wanted)
    assert got["t2i"]["threshold"] == pytest.approx(0.88) and got["t2i"]["met"]
    assert got["t2i"]["margin"] == pytest.approx(0.005)
    assert got["local"]["threshold"] == pytest.approx(0.81) and not got["local"]["met"]
    assert got["edit"]["met"] is False and got["edit"]["reference_score"] == 0.6
    table = targets.summary(report, got, split_edits=True)
    assert "| student | 0.885 | 0.500 | 0.800 | 0.200 |" in table
    assert "| anchor | 0.900 |  |  |  |" in table
    assert ("| local: GEdit-style correct, local >= 0.9 x local_edit's | 0.800 | >= 0.810 | "
            "-0.010 | NOT met |") in table
    assert "t2i: GenEval-style mean >= anchor's - 0.02" in table
    assert "correct, local" not in targets.summary(report, {}, split_edits=False)
    with pytest.raises(ValueError, match="none for 'anchor'"):
        targets.check(report, {"x": target("edit", "anchor", "ratio", 0.9)})


def test_score_jobs_follow_routes_recipes_and_targets() -> None:
    """The final scores' models: the anchor, each routed teacher at its CFG scale, the
    student; each on what its recipe trains and what a target compares it on."""
    from danceopd_jax.config import routes_of, validate

    def jobs(config) -> dict[str, tuple]:
        teachers = {name: {} for name in config.teachers}
        return {j.name: (j.cfg_alpha, j.tasks)
                for j in score_jobs(config, routes_of(config), teachers, {})}

    # The omni base (the anchor) trains on T2I and edits, so it is scored on both.
    assert jobs(tiny_config("edit_fusion")) == {
        "anchor": (1.0, ("t2i", "edit")), "local_edit": (1.0, ("edit",)),
        "global_edit": (1.0, ("edit",)), "student": (1.0, ("t2i", "edit"))}
    assert jobs(tiny_config("cfg_absorption")) == {
        "anchor": (1.0, ("t2i",)), "anchor@cfg3.5": (3.5, ("t2i",)), "student": (1.0, ("t2i",))}
    config = tiny_config("t2i_edit_budget")  # the T2I-only anchor of the shapes family
    assert jobs(config)["anchor"] == (1.0, ("t2i",))
    config.eval.targets.t2i.reference = "joint_edit"  # compared on T2I: scored on it too
    assert jobs(config) == {"anchor": (1.0, ("t2i",)), "joint_edit": (1.0, ("t2i", "edit")),
                            "student": (1.0, ("t2i", "edit"))}
    for field, value, match in (("score", "fid", "score='fid'"), ("rule", "above", "rule"),
                                ("reference", "nobody", "not a teacher")):
        bad = tiny_config()
        bad.eval.targets.edit[field] = value
        with pytest.raises(ValueError, match=match):
            validate(bad)
    # Edit targets need a route reading a bucket with source images; t2i_relations has none.
    for bucket in ("t2i", "t2i_relations"):
        bad = tiny_config("cfg_absorption")
        bad.routes.t2i.bucket = bucket
        bad.eval.targets.t2i.score = "edit"
        validate(bad)  # the config alone does not know which buckets hold edits
        with pytest.raises(ValueError, match="no route reads an edit bucket"):
            validate_edit_targets(bad, routes_of(bad))
    validate_edit_targets(tiny_config("edit_fusion"), routes_of(tiny_config("edit_fusion")))
    bad = tiny_config("t2i_edit_budget")
    bad.teachers.anchor.bucket = "mix"
    with pytest.raises(ValueError, match="with no mix"):
        validate(bad)


def test_every_runs_each_hook_at_its_own_interval() -> None:
    calls = []
    on_interval, interval = every((4, lambda s, n: calls.append(("a", n))),
                                  (6, lambda s, n: calls.append(("b", n))),
                                  (0, lambda s, n: calls.append(("off", n))))
    assert interval == 2
    for step in range(interval, 13, interval):
        on_interval(None, step)
    assert calls == [("a", 4), ("b", 6), ("a", 8), ("a", 12), ("b", 12)]
    assert every((0, print)) == (None, 0)


@pytest.mark.slow
def test_evaluate_cli_writes_json_and_markdown(trained, tmp_path: Path) -> None:
    workdir, _ = trained
    out = subprocess.run(
        [sys.executable, "-m", "danceopd_jax.evaluate", f"--workdir={workdir}",
         "--num_per_category=1", "--seeds=0,1", "--sample_steps=2",
         "--models=student,anchor,joint_edit@cfg2", "--nofd"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    path = workdir / "eval" / "shapesbench_heldout_steps2.json"
    report = json.loads(path.read_text())
    assert report["seeds"] == [0, 1] and report["classifier"] is None
    models = report["models"]
    assert set(models["student"]) >= {"t2i", "edit", "per_seed"}
    assert {"t2i", "edit"} <= set(models["anchor"])  # the omni base: trained on both
    assert "t2i" not in models["joint_edit@cfg2"]
    assert models["joint_edit@cfg2"]["cfg_alpha"] == 2.0
    student = models["student"]
    assert set(student["t2i"]) == {*CATEGORIES, "mean", "object_count"}
    assert student["t2i"]["mean"]["mean"] == pytest.approx(np.mean(
        [student["per_seed"][s]["t2i"]["mean"] for s in ("0", "1")]))
    table = path.with_suffix(".md").read_text()
    assert "| student | 1 |" in table and "subject-remove" in table and table in out.stdout
    assert "exactly as many objects as asked for" in table
    bad = subprocess.run(
        [sys.executable, "-m", "danceopd_jax.evaluate", f"--workdir={workdir}",
         "--models=nobody", "--nofd"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "no teacher 'nobody'" in bad.stderr


@pytest.mark.slow
def test_evaluate_scores_the_teachers_of_a_workdir_without_a_student(trained,
                                                                      tmp_path: Path) -> None:
    """Teachers are scored as soon as they are trained: only "student" needs a checkpoint."""
    workdir, _ = trained
    fresh = tmp_path / "fresh"  # the workdir before its student's first checkpoint
    fresh.mkdir()
    shutil.copy(workdir / "config.json", fresh)
    for sub in ("teachers", "data"):
        (fresh / sub).symlink_to(workdir / sub)
    sizes = dict(models=["anchor"], seeds=(0,), sample_steps=2, num=1, fd=False)
    def anchor_scores(run: Path) -> dict:
        scores = evaluate_workdir(run, **sizes)[0]["models"]["anchor"]
        return {k: v for k, v in scores.items() if k != "wall_time_s"}

    assert anchor_scores(fresh) == anchor_scores(workdir)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        evaluate_workdir(fresh, **{**sizes, "models": ["anchor", "student"]})


@pytest.mark.slow
def test_bench_frechet_distance_and_training_curve(trained, tmp_path: Path) -> None:
    """FD is reported per task (0 for the exact targets themselves); a run with
    eval.curve_every writes held-out scores at step 0 and every curve_every steps."""
    workdir, _ = trained
    report, path = evaluate_workdir(workdir, models=["student"], seeds=(0,), sample_steps=2,
                                    num=2, fd=True, cache_dir=tmp_path / "fd",
                                    recipe=TINY_RECIPE)
    fd = report["models"]["student"]["fd"]
    assert set(fd) == {"t2i", "edit"} and all(v["mean"] >= 0 for v in fd.values())
    assert report["classifier"]["key"]["recipe"]["steps"] == TINY_RECIPE.steps
    assert "| FD |" in path.with_suffix(".md").read_text()

    run = tmp_path / "run"
    shutil.copytree(workdir / "teachers", run / "teachers")
    distill.run(tiny_config(**{"eval.curve_every": 2, "eval.curve_num": 1}), run)
    rows = [json.loads(r) for r in (run / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(0 <= r["t2i"] <= 1 and 0 <= r["edit"] <= 1 for r in rows)

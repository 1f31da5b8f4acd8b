"""The trainer: batches, checkpoints and exact resume, non-finite losses, clear errors, and the
main job end to end (teachers included) at a tiny size."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_config, losses, tiny_config, tiny_flags
from helpers import tensorboard_tags

from danceopd_jax import worlds
from danceopd_jax.config import routes_of, validate
from danceopd_jax.core.errors import CheckpointError
from danceopd_jax.core.routing import Route, Slot, per_step_route
from danceopd_jax.data.batches import RouteBatcher
from danceopd_jax.data.store import cached, digest, load_params, save_params
from danceopd_jax.jobs import distill
from danceopd_jax.jobs.workdir import load_student, open_workdir
from danceopd_jax.train.checkpoint import RunCheckpoints
from danceopd_jax.train.loop import NonFiniteLossError, fit
from danceopd_jax.train.mesh import make_mesh

# --- batches --------------------------------------------------------------------------------

def bucket(n: int, **arrays) -> dict[str, np.ndarray]:
    """A T2I-like bucket of n blank 12 px rows."""
    return {"target": np.zeros((n, 12, 12, 3), np.uint8),
            "source": np.zeros((n, 12, 12, 3), np.uint8), "has_source": np.zeros(n, bool),
            "input_ids": np.zeros((n, 4), np.int32), "attention_mask": np.ones((n, 4), bool),
            **arrays}


def test_batches_are_static_slots_and_reproducible():
    n = 10
    t2i = bucket(n, input_ids=np.arange(n)[:, None].repeat(4, 1))
    edit = {**t2i, "has_source": np.ones(n, bool), "input_ids": 100 + t2i["input_ids"]}
    routes = [Route("a", "anchor", "t2i", 0.25), Route("b", "edit", "edit", 0.75)]
    batcher = RouteBatcher({"t2i": t2i, "edit": edit}, routes, "per_sample", 8, seed=3)
    slots, batch = batcher(5)
    assert [(s.route, s.start, s.stop) for s in slots] == [(0, 0, 2), (1, 2, 8)]
    assert np.all(batch["input_ids"][:2] < 100) and np.all(batch["input_ids"][2:] >= 100)
    assert not batch["has_source"][:2].any() and batch["has_source"][2:].all()
    again = batcher(5)[1]
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    assert not np.array_equal(batch["input_ids"], batcher(6)[1]["input_ids"])
    assert batch["target"].dtype == np.float32 and batch["target"].min() == -1.0
    per_step = RouteBatcher({"t2i": t2i, "edit": edit}, routes, "per_step", 8, seed=3)
    (slot,), _ = per_step(0)
    assert (slot.start, slot.stop) == (0, 8)


def test_t2i_only_batches_have_no_source_slot():
    n = 4
    t2i = bucket(n)
    _, batch = RouteBatcher({"t2i": t2i}, [Route("a", "anchor", "t2i", 1.0)], "per_sample", 2, 0)(0)
    assert "source" not in batch and "has_source" not in batch


# --- checkpoints ----------------------------------------------------------------------------

def test_params_round_trip_and_missing_or_corrupt(tmp_path):
    params = {"layer": {0: {"kernel": jnp.arange(6.0).reshape(2, 3)}}, "bias": jnp.ones(3)}
    save_params(tmp_path / "m", params, {"recipe": 1})
    restored, recipe = load_params(tmp_path / "m", params)
    assert recipe == {"recipe": 1}
    np.testing.assert_array_equal(restored["layer"][0]["kernel"], params["layer"][0]["kernel"])
    with pytest.raises(CheckpointError, match="recipe.json is missing"):
        load_params(tmp_path / "nowhere", params)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_params(tmp_path / "m", {"other": jnp.ones(2)})


def test_cached_builds_once_then_loads_by_key(tmp_path):
    """data/store.cached, the one build-or-load-by-key of teachers, converted weights and the
    FD classifier: built once, reused with the same key, a changed key is named (or rebuilt),
    and a load-only call on nothing says what is missing."""
    built = []

    def build(value: float):
        def make():
            built.append(value)
            return {"w": jnp.full(3, value)}, {"note": value}
        return make

    like = {"w": jnp.zeros(3)}
    key = {"world": {"seed": 1}, "steps": 2}
    params, recipe, made = cached(tmp_path / "m", key, like, build(1.0), "test model")
    assert made and recipe == {"key": key, "note": 1.0}
    params, recipe, made = cached(tmp_path / "m", key, lambda r: like, build(2.0), "test model")
    assert not made and built == [1.0] and float(params["w"][0]) == 1.0
    changed = {"world": {"seed": 2}, "steps": 2}
    with pytest.raises(CheckpointError, match=r"test model .* \(changed: world/seed;"):
        cached(tmp_path / "m", changed, like, build(2.0), "test model")
    params, _, made = cached(tmp_path / "m", changed, like, build(2.0), "test model",
                             stale="rebuild")
    assert made and float(params["w"][0]) == 2.0
    with pytest.raises(CheckpointError, match="holds no test model"):
        cached(tmp_path / "none", key, like, None, "test model")
    save_params(tmp_path / "old", params, key)  # a teacher saved before recipes had a "key"
    assert not cached(tmp_path / "old", key, like, None, "test model")[2]
    assert digest(key) == digest({"steps": 2, "world": {"seed": 1}}) != digest(changed)


def test_run_checkpoint_missing_and_corrupt(tmp_path):
    ckpts = RunCheckpoints(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ckpts.restore({"w": jnp.ones(3)})
    ckpts.save(1, {"w": jnp.ones(3)}, {"note": "x"})
    state, meta = ckpts.restore({"w": jnp.zeros(3)})
    np.testing.assert_array_equal(state["w"], 1.0)
    assert meta["note"] == "x"
    for f in (tmp_path / "ck" / "1" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="delete"):
        RunCheckpoints(tmp_path / "ck").restore({"w": jnp.zeros(3)})


# --- clear errors before anything compiles --------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    ({"world.image_size": 15}, "not divisible by model.patch_size=4"),
    ({"model.width": 32, "model.heads": 2}, r"4x4x3 = 48 values, more than the width 32"),
    ({"danceopd.query_k": 0}, "K=0"),
    ({"training.routing": "sometimes"}, "training.routing"),
    ({"training.cooldown_fraction": 1.5}, r"cooldown_fraction=1.5.*\[0, 1\]"),
    ({"model.coarse_scale": 2}, r"model.coarse_scale=2 must be 0 .* grid 3 .*\[0, 1, 3\]"),
])
def test_bad_config_fails_fast(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        worlds.build(tiny_config(**overrides), tmp_path)


@pytest.mark.parametrize("cooldown, rates", [
    (0.4, [0, .5, 1, 1, 1, 1, 1, .75, .5, .25]),
    (0.0, [0, .5, 1, 1, 1, 1, 1, 1, 1, 1]),
])
def test_student_rate_warms_up_holds_and_cools_down(cooldown, rates):
    """With a constant gradient each Adam update is the rate itself: 2 warm-up steps, then
    constant, then (cooldown > 0) linear to zero over the last 40% of 10 steps. (Exact resume
    restores the schedule's count: the resume test runs inside its 20-step warm-up.)"""
    import ml_collections
    import optax

    from danceopd_jax.train.state import student_optimizer

    training = ml_collections.ConfigDict(dict(lr=0.1, weight_decay=0.0, grad_clip=0.0,
                                              warmup_steps=2, steps=10,
                                              cooldown_fraction=cooldown))
    optimizer, param = student_optimizer(training), jnp.zeros(())
    state, updates = optimizer.init(param), []
    for _ in range(training.steps):
        update, state = optimizer.update(jnp.ones(()), state, param)
        param = optax.apply_updates(param, update)
        updates.append(-float(update))
    np.testing.assert_allclose(updates, 0.1 * np.array(rates), rtol=2e-5)


def test_bad_routes_fail_fast(tmp_path):
    config = tiny_config()
    config.routes.edit.teacher = "ghost"
    with pytest.raises(ValueError, match="teacher 'ghost'"):
        worlds.build(config, tmp_path)
    config = tiny_config()
    config.routes.t2i.weight, config.routes.edit.weight = 0.0, 0.0
    with pytest.raises(ValueError, match="all route weights are zero"):
        worlds.build(config, tmp_path)
    config = tiny_config()
    config.routes.edit.weight = -0.5
    with pytest.raises(ValueError, match="weight -0.5"):
        worlds.build(config, tmp_path)
    config = tiny_config()
    config.routes.edit.bucket = "t2i"
    del config.eval.targets["edit"]  # no edit route left to hold it to
    with pytest.raises(ValueError, match="no source images"):
        worlds.build(config, tmp_path)


def run_main(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "danceopd_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("flag, match", [("--config.training.stepz=3", "stepz"),
                                         ("--config.training.steps=many", "many")])
def test_unknown_or_ill_typed_override_fails_before_compiling(tmp_path, flag, match):
    out = run_main("--config=configs/t2i_edit.py", f"--workdir={tmp_path}", flag, timeout=120)
    assert out.returncode != 0
    assert match in out.stderr
    assert not (tmp_path / "teachers").exists()


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections'
@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.py")))
def test_every_route_and_target_of_a_config_can_be_overridden(name):
    """--config.routes.<name>.weight=... names every route and target of every config file
    (edit_fusion's global route was once keyed "global", a keyword no command line can name)."""
    from absl import flags
    from ml_collections import config_flags

    config = load_config(name)
    targets = config.eval.get("targets", {})
    argv = ["main", f"--config={ROOT / 'configs' / name}.py",
            *(f"--config.routes.{r}.weight=0.125" for r in config.routes),
            *(f"--config.eval.targets.{t}.value=0.5" for t in targets)]
    values = flags.FlagValues()
    parsed = config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    assert {r.weight for r in parsed.value.routes.values()} == {0.125}
    assert {t.value for t in parsed.value.eval.get("targets", {}).values()} <= {0.5}


# --- the main job, end to end ---------------------------------------------------------------

@pytest.mark.slow
def test_main_job_trains_checkpoints_samples_and_scores(trained):
    workdir, scores = trained
    assert (workdir / "teachers" / "anchor" / "recipe.json").is_file()
    assert (workdir / "teachers" / "joint_edit" / "recipe.json").is_file()
    assert RunCheckpoints(workdir / "checkpoints").latest_step() == 4
    assert sorted(losses(workdir)) == [1, 2, 3, 4]
    assert all(np.isfinite(v) for v in losses(workdir).values())
    assert {p.name for p in (workdir / "samples").glob("*.png")} >= {
        "t2i_step000004.png", "joint_edit_step000004.png", "t2i_step000002.png"}
    models = scores["models"]  # ShapesBench: the anchor, the routed teacher, the student
    assert set(models) == {"anchor", "joint_edit", "student"}
    # The omni base is scored on what its recipe trains (T2I and edits), the edit teacher on edits.
    assert {"t2i", "edit"} <= set(models["anchor"]) and "t2i" not in models["joint_edit"]
    assert {"t2i", "edit", "per_seed", "wall_time_s"} <= set(models["student"])
    edits = dict(models["student"]["edit"])
    by_style = edits.pop("by_style")  # style changes by style: the same rates
    assert set(by_style) <= {"invert", "grayscale", "outline"} and by_style
    assert all(r["correct"]["mean"] <= min(r["changed"]["mean"], r["preserved"]["mean"])
               for r in [*edits.values(), *by_style.values()])
    assert set(scores["targets"]) == {"t2i", "edit"}
    assert all(isinstance(v["met"], bool) for v in scores["targets"].values())
    assert set(scores["wall_time_s"]) == {"teachers", "distill", "scores", "total"}
    written = json.loads((workdir / "scores.json").read_text())
    assert written["models"]["student"] == models["student"]
    assert "subject-remove" in (workdir / "scores.md").read_text()


@pytest.mark.slow
def test_resume_continues_exactly(trained, tmp_path):
    """Stop after 2 steps, restart: steps 3-4 have the same losses as the uninterrupted run,
    and the teachers are reused, not retrained."""
    full, _ = trained
    shutil.copytree(full / "teachers", tmp_path / "teachers")
    distill.run(tiny_config(**{"training.steps": 2}), tmp_path)
    distill.run(tiny_config(), tmp_path)
    resumed, uninterrupted = losses(tmp_path), losses(full)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert resumed[step] == uninterrupted[step], step


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(trained, tmp_path):
    """A learning rate of 1e30 makes step 1's update finite but huge (step 2's loss would not
    be finite): those weights are not sound, so they are not saved and the run stops there;
    without the soundness check, the loss alone stops it at step 2."""
    full, _ = trained
    shutil.copytree(full / "teachers", tmp_path / "teachers")
    config = tiny_config(**{"training.lr": 1e30, "training.checkpoint_every": 1,
                            "training.grad_clip": 0.0, "training.warmup_steps": 0})
    with pytest.raises(NonFiniteLossError, match="after step 1 are not sound") as err:
        distill.run(config, tmp_path)
    assert "there is no sound checkpoint" in str(err.value)
    assert RunCheckpoints(tmp_path / "checkpoints").latest_step() is None
    config.training.max_param_growth = 0.0  # finite weights only
    with pytest.raises(NonFiniteLossError, match="non-finite at step 2") as err:
        distill.run(config, tmp_path)
    assert "last sound checkpoint is step 1" in str(err.value)
    assert RunCheckpoints(tmp_path / "checkpoints").latest_step() == 1


@pytest.mark.slow
def test_main_cli_and_sample_cli(trained, tmp_path):
    workdir, _ = trained
    out = subprocess.run(
        [sys.executable, "-m", "danceopd_jax.sample", f"--workdir={workdir}",
         "--prompt=a red circle at the top left on a blue background",
         f"--out={tmp_path / 't2i.png'}", "--num_images=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "t2i.png").is_file()
    src = next((workdir / "samples").glob("joint_edit_step*.png"))
    out = subprocess.run(
        [sys.executable, "-m", "danceopd_jax.sample", f"--workdir={workdir}",
         "--prompt=remove the red circle", f"--source={src}", "--resize",
         f"--out={tmp_path / 'edit.png'}",
         "--num_images=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    missing = subprocess.run(
        [sys.executable, "-m", "danceopd_jax.sample", f"--workdir={tmp_path / 'none'}",
         "--prompt=x"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "no config.json" in missing.stderr
    # the real command line, reusing the run's teachers: 1 more step resumes from step 4
    # (on a copy: the shared run stays at step 4 for the other tests, whatever their order)
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    run = run_main("--config=configs/t2i_edit.py", f"--workdir={resumed}", *tiny_flags(),
                   "--config.training.steps=5")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reused" in run.stderr and "resuming from checkpoint step 4" in run.stderr
    assert RunCheckpoints(resumed / "checkpoints").latest_step() == 5


@pytest.mark.slow
def test_lora_student_trains_only_low_rank_factors(trained, tmp_path):
    full, _ = trained
    shutil.copytree(full / "teachers", tmp_path / "teachers")
    distill.run(tiny_config(**{"training.steps": 2, "training.lora_rank": 4}), tmp_path)
    meta_state = tmp_path / "checkpoints" / "2" / "state"
    assert meta_state.is_dir()
    losses_lora = losses(tmp_path)
    assert sorted(losses_lora) == [1, 2] and all(np.isfinite(v) for v in losses_lora.values())
    # the first update starts from a zero LoRA delta: the student IS the anchor, so step 1's
    # loss equals the full fine-tuning run's step 1 loss
    assert losses_lora[1] == pytest.approx(losses(full)[1], rel=1e-5)


@pytest.mark.slow
def test_cfg_absorption_runs_t2i_only_with_a_guided_teacher(trained, tmp_path):
    """The CFG-absorption config: one T2I route whose teacher is the anchor under alpha 3.5
    (no source slot anywhere), so the student's first loss is the guided-vs-plain gap."""
    full, _ = trained
    # Its anchor is the shapes family's T2I anchor: the omni family's t2i_anchor (same recipe).
    shutil.copytree(full / "teachers" / "t2i_anchor", tmp_path / "teachers" / "anchor")
    scores = distill.run(tiny_config("cfg_absorption", **{"training.steps": 2}), tmp_path)
    assert set(scores["models"]) == {"anchor", "anchor@cfg3.5", "student"}
    assert "edit" not in scores["models"]["student"]
    first = losses(tmp_path)[1]
    assert np.isfinite(first) and first > 0  # student == anchor, teacher == guided anchor


@pytest.mark.slow
def test_tensorboard_holds_the_metrics_rate_grids_and_scores(trained):
    """`tensorboard --logdir` on the workdir shows what metrics.jsonl, samples/ and
    scores.json hold."""
    workdir, _ = trained
    tags = tensorboard_tags(workdir / "tensorboard")
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"] for r in rows if r["phase"] == "danceopd"}
    for name in ("loss", "grad_norm", "lr", "steps_per_sec"):
        assert tags[f"danceopd/{name}"] == steps, name
    assert all("lr" in r for r in rows if r["phase"] == "danceopd")
    grids = {t for t in tags if t.startswith("samples/")}
    assert grids and all(tags[t] == {2, 4} for t in grids)  # sample_every=2 of 4 steps
    assert "scores/student/t2i" in tags and "scores/anchor/t2i" in tags


def test_per_step_routing_routes_each_whole_batch_to_one_route(trained, tmp_path, monkeypatch):
    """The reference's mode: every step's batch is ONE slot, of the route drawn for that step
    from the shared seed, and all its rows come from that route's bucket."""
    full, _ = trained
    shutil.copytree(full / "teachers", tmp_path / "teachers")
    seen = []
    real_update = distill.method_update

    def recording(*args, **kwargs):
        update = real_update(*args, **kwargs)

        def record(state, batches, slots):  # one call: its steps' batches stacked
            seen.extend((slots, has) for has in np.asarray(batches["has_source"]))
            return update(state, batches, slots)
        return record

    monkeypatch.setattr(distill, "method_update", recording)
    # No checkpoint or sample grid inside the run: only the slots decide the calls' lengths.
    config = tiny_config(**{"training.steps": 4, "training.routing": "per_step",
                            "training.checkpoint_every": 4, "training.sample_every": 4})
    distill.run(config, tmp_path)
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
    routes = routes_of(config)
    batch = config.training.batch_size
    for step, (slots, has_source) in enumerate(seen):
        route = per_step_route(config.training.seed, step, [r.weight for r in routes])
        assert slots == (Slot(route, 0, batch),)
        assert has_source.all() == (routes[route].bucket != "t2i") == has_source.any()
    assert len(seen) == 4


@dataclasses.dataclass(frozen=True)
class Counted:
    """A stand-in train state: how many steps have run."""
    step: int


def test_calls_are_steps_per_call_long_or_one_step():
    """fit runs steps_per_call steps in a call, or a single step where a hook falls inside the
    span or the slots change in it: every step once, in order, in at most two call lengths (two
    programs per slot layout), and hooks see the state after their step."""
    calls, hooked = [], []

    def batcher(step, shards=None):  # slot layout "b" on steps 6 and 7, "a" elsewhere
        return ("b",) if step in (6, 7) else ("a",), {"x": np.full((2, 1), step, np.float32)}

    def update(state, batches, slots):
        steps = [int(x) for x in np.asarray(batches["x"])[:, 0, 0]]
        calls.append((slots, steps))
        n = len(steps)
        return Counted(state.step + n), {"loss": jnp.ones(n), "finite": jnp.ones(n, bool),
                           "grad_norm": jnp.ones(n)}

    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    end = fit(update, Counted(0), batcher, mesh, steps=14, name="t", steps_per_call=3,
              on_interval=lambda state, step: hooked.append((state.step, step)),
              interval_every=5)
    assert end.step == 14 and hooked == [(5, 5), (10, 10)]
    assert [s for _, steps in calls for s in steps] == list(range(14))
    assert {len(steps) for _, steps in calls} == {1, 3}
    assert all(set(slots) == {"b" if s in (6, 7) else "a" for s in steps}
               for slots, steps in calls)
    # 0-2; 3-5 would pass the hook at 5: 3, 4; 5-7 changes slots: 5, 6; 7-9 changes: 7;
    # 8-10 passes 10: 8, 9; 10-12; 13 (the end).
    assert [len(steps) for _, steps in calls] == [3, 1, 1, 1, 1, 1, 1, 1, 3, 1]


@pytest.mark.slow
def test_steps_per_call_runs_the_same_steps(trained, tmp_path):
    """Four steps in one jitted call (train/step.consecutive) are the four steps of four calls:
    the same losses and the same student."""
    full, _ = trained
    runs = {}
    for per_call in (1, 4):
        workdir = tmp_path / f"per_call_{per_call}"
        shutil.copytree(full / "teachers", workdir / "teachers")
        distill.run(tiny_config(**{"training.steps_per_call": per_call,
                                   "training.checkpoint_every": 4,
                                   "training.sample_every": 4}), workdir)
        runs[per_call] = (losses(workdir), load_student(workdir, open_workdir(workdir)))
    (one, student_one), (four, student_four) = runs[1], runs[4]
    assert sorted(one) == sorted(four) == [1, 2, 3, 4]
    np.testing.assert_allclose([four[s] for s in sorted(four)], [one[s] for s in sorted(one)],
                               rtol=1e-5)
    for a, b in zip(jax.tree.leaves(student_one.params), jax.tree.leaves(student_four.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["t2i_edit", "edit_fusion", "t2i_edit_budget", "cfg_absorption"])
def test_default_configs_reuse_the_shipped_teachers(name):
    """The README's main job must not silently train a teacher for an hour: every teacher the
    config routes (and what it starts from) is shipped with exactly the config's recipe."""
    from danceopd_jax.config import routes_of
    from danceopd_jax.train.teachers import find_shipped, needed_teachers, recipe, shipped_dir

    config = load_config(name)
    for teacher in needed_teachers(config, routes_of(config)):
        assert find_shipped(shipped_dir(config), teacher, recipe(config, teacher)), (
            f"no shipped {teacher} teacher was made with the recipe configs/{name}.py asks for: "
            "retrain and ship it (docs/teachers.md)")


@pytest.mark.slow
def test_shipped_teachers_are_reused_only_on_a_matching_recipe(trained, tmp_path):
    """A shipped teacher whose recipe matches is copied into the workdir (so sampling works from
    the workdir alone); one whose recipe differs is trained instead."""
    from danceopd_jax.config import routes_of
    from danceopd_jax.train.mesh import make_mesh
    from danceopd_jax.train.teachers import prepare_teachers

    full, _ = trained
    shipped = tmp_path / "shipped"
    shutil.copytree(full / "teachers" / "anchor", shipped / "anchor")
    config = tiny_config()
    config.teachers.joint_edit.steps = 1  # recipe differs from anything shipped
    world = worlds.build(config, tmp_path / "run")
    backbone, text = world.init_backbone, world.init_text
    teachers, _ = prepare_teachers(config, routes_of(config), world.models, backbone, text,
                                   world.train, make_mesh(), tmp_path / "run", shipped)
    assert (tmp_path / "run" / "teachers" / "anchor" / "recipe.json").is_file()
    recipe = json.loads((tmp_path / "run" / "teachers" / "joint_edit" / "recipe.json").read_text())
    assert recipe["key"]["teacher"]["steps"] == 1 and recipe["made"] == "trained"
    np.testing.assert_array_equal(
        teachers["anchor"]["proj_out"]["kernel"],
        load_params(shipped / "anchor", {"backbone": backbone, "text": text})[0]["backbone"][
            "proj_out"]["kernel"])


def test_ship_copies_only_the_teachers_the_workdir_trained(tmp_path, monkeypatch):
    """--ship puts what the run trained into the package; a teacher it reused from the package
    (maybe another family's, under another name) is already there and is not copied again."""
    import danceopd_jax.train.teachers as teachers_module
    from danceopd_jax.jobs.teachers import ship_teachers

    monkeypatch.setattr(teachers_module, "ASSETS_DIR", tmp_path / "assets")
    config = tiny_config()
    workdir = tmp_path / "run"
    params = {"w": np.arange(3.0)}
    save_params(workdir / "teachers" / "t2i_anchor", params, {"made": "shipped", "key": {"k": 0}})
    save_params(workdir / "teachers" / "anchor", params, {"made": "trained", "key": {"k": 1}})
    assert ship_teachers(config, workdir) == ["anchor"]
    family = tmp_path / "assets" / config.shipped_teachers
    assert sorted(p.name for p in family.iterdir()) == ["anchor"]
    assert json.loads((family / "anchor" / "recipe.json").read_text())["key"] == {"k": 1}
    np.testing.assert_array_equal(load_params(family / "anchor", params)[0]["w"], params["w"])


def test_teachers_command_trains_only_the_named_teachers(tmp_path, monkeypatch):
    """--teachers=anchor trains the anchor alone (the edit teacher is neither trained nor
    shipped); a name the config does not define is refused, naming it and the choices."""
    import danceopd_jax.train.teachers as teachers_module
    from danceopd_jax.core.errors import ConfigError
    from danceopd_jax.jobs.teachers import make_teachers, ship_teachers

    monkeypatch.setattr(teachers_module, "ASSETS_DIR", tmp_path / "assets")
    config = tiny_config("t2i_edit_budget")
    assert sorted(config.teachers) == ["anchor", "joint_edit"]
    with pytest.raises(ConfigError,
                       match=r"\['teacher_b'\].*choose from \['anchor', 'joint_edit'\]"):
        make_teachers(config, tmp_path, evaluate=False, only=["teacher_b"])
    assert make_teachers(config, tmp_path, evaluate=False, only=["anchor"]) is None
    assert sorted(p.name for p in (tmp_path / "teachers").iterdir()
                  if p.is_dir() and not p.name.startswith("_")) == ["anchor"]
    recipe = json.loads((tmp_path / "teachers" / "anchor" / "recipe.json").read_text())
    assert recipe["made"] == "trained" and recipe["key"]["teacher"]["steps"] == 3
    save_params(tmp_path / "teachers" / "joint_edit", {"w": np.zeros(2)},
                {"made": "trained", "key": {"k": 1}})
    assert ship_teachers(config, tmp_path, ["anchor"]) == ["anchor"]
    assert ship_teachers(config, tmp_path) == ["anchor", "joint_edit"]  # default: all


def test_the_omni_family_reuses_the_shipped_t2i_anchor_by_its_recipe():
    """The omni base starts from the shapes family's T2I anchor: a teacher's key lists what
    makes its weights, not its name, so `t2i_anchor` finds the shipped `anchor` in the other
    family's folder. A recipe that differs in anything finds nothing."""
    from danceopd_jax.train.teachers import SHIPPED_DIR, find_shipped, recipe, shipped_dir

    config = load_config("t2i_edit")
    assert config.teachers.anchor.init == "t2i_anchor"
    want = recipe(config, "t2i_anchor")
    assert "name" not in want
    assert find_shipped(shipped_dir(config), "t2i_anchor", want) == SHIPPED_DIR / "anchor"
    assert find_shipped(None, "t2i_anchor", want) is None  # never reuse
    config.teachers.t2i_anchor.lr = 5e-4
    assert find_shipped(shipped_dir(config), "t2i_anchor", recipe(config, "t2i_anchor")) is None
    config.teachers.t2i_anchor.lr = 1e-3
    config.model.coarse_scale = 2  # an optional model field enters the key only when set
    config.model.text_bidirectional = True
    assert recipe(config, "t2i_anchor")["model"] == want["model"] | {"coarse_scale": 2,
                                                                     "text_bidirectional": True}
    assert find_shipped(shipped_dir(config), "t2i_anchor", recipe(config, "t2i_anchor")) is None


def test_keep_t2i_enters_the_teachers_key_only_when_set():
    """A base that keeps its parent's T2I is another teacher; with keep_t2i off, the key is the
    shipped base's, so the shipped omni family is still found. It needs a parent to keep."""
    from danceopd_jax.train.teachers import find_shipped, recipe, shipped_dir

    config = load_config("t2i_edit")
    assert find_shipped(shipped_dir(config), "anchor", recipe(config, "anchor"))
    config.teachers.anchor.keep_t2i = True
    assert recipe(config, "anchor")["teacher"]["keep_t2i"] is True
    assert find_shipped(shipped_dir(config), "anchor", recipe(config, "anchor")) is None
    config.teachers.t2i_anchor.keep_t2i = True
    with pytest.raises(ValueError, match=r"teachers.t2i_anchor.keep_t2i=True .* 'scratch'"):
        validate(config)


@pytest.mark.slow
def test_omni_family_trains_a_mixed_base_then_a_fine_tune(tmp_path):
    """The omni family's recipe, tiny: the base (anchor) is fine-tuned from a T2I anchor on a
    mix of T2I and edit buckets, so its source pathway learns (source_embed leaves zero), and
    is saved with the T2I anchor's text encoder, frozen; the joint-edit teacher is fine-tuned
    from the base in two stages; each recipe.json carries the mix and its init chain."""
    from danceopd_jax.config import routes_of
    from danceopd_jax.train.mesh import make_mesh
    from danceopd_jax.train.teachers import prepare_teachers, shipped_dir

    config = tiny_config()
    config.teachers.anchor.mix = {"t2i": 0.5, "joint_edit": 0.5}  # edits in every tiny batch
    config.teachers.anchor.keep_t2i = True  # its T2I rows regress onto t2i_anchor's field
    assert shipped_dir(config).name == "omni_teachers"
    world = worlds.build(config, tmp_path)
    assert not np.any(world.init_backbone["source_embed"])  # the pathway starts closed
    teachers, _ = prepare_teachers(config, routes_of(config), world.models, world.init_backbone,
                                   world.init_text, world.train, make_mesh(), tmp_path, None)
    base, edit = teachers["anchor"], teachers["joint_edit"]
    assert np.any(np.asarray(base["source_embed"]))  # the base saw source images
    assert "t2i_anchor" not in teachers  # a parent: needed only to train the base
    like = {"backbone": world.init_backbone, "text": world.init_text}
    saved = {n: load_params(tmp_path / "teachers" / n, like)[0] for n in ("t2i_anchor", "anchor")}
    assert not np.any(np.asarray(saved["t2i_anchor"]["backbone"]["source_embed"]))
    leaves = {n: jax.tree.leaves(t) for n, t in (("base", saved["anchor"]["text"]),
                                                  ("t2i", saved["t2i_anchor"]["text"]),
                                                  ("init", world.init_text))}
    assert all(np.array_equal(a, b) for a, b in zip(leaves["base"], leaves["t2i"], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves["t2i"], leaves["init"], strict=True))
    assert not np.array_equal(base["source_embed"], edit["source_embed"])
    recipes = {n: json.loads((tmp_path / "teachers" / n / "recipe.json").read_text())["key"]
               for n in ("anchor", "joint_edit_stage1", "joint_edit")}
    assert recipes["anchor"]["teacher"]["bucket"] == "mix"
    assert recipes["anchor"]["teacher"]["mix"] == {"t2i": 0.5, "joint_edit": 0.5}
    assert recipes["anchor"]["teacher"]["keep_t2i"] is True
    assert "keep_t2i" not in recipes["joint_edit"]["teacher"]
    # The joint-edit teacher: a warm restart from its first stage, itself fine-tuned from the
    # base; each key nests its parent's.
    assert recipes["joint_edit_stage1"]["init"] == recipes["anchor"]
    assert recipes["joint_edit"]["init"] == recipes["joint_edit_stage1"]
    assert recipes["joint_edit"]["teacher"]["init"] == "joint_edit_stage1"
    assert "mix" not in recipes["joint_edit"]["teacher"]
    # A main job whose base and edit teacher are shipped never loads what the base started from.
    again, text = prepare_teachers(config, routes_of(config), world.models, world.init_backbone,
                                   world.init_text, world.train, make_mesh(), tmp_path / "again",
                                   tmp_path / "teachers")
    assert sorted(again) == ["anchor", "joint_edit"]
    assert sorted(p.name for p in (tmp_path / "again" / "teachers").iterdir()) == sorted(again)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(text), leaves["base"],
                                                     strict=True))

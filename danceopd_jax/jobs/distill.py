"""The main job: world data -> teachers -> student (DanceOPD or a baseline) -> scores.

A world (worlds/) provides the data, the models and the teachers: the shapes world by
default, prepared data and diffusers teachers when config.world.kind = "prepared"; the
training loop, the step and the algorithm are the same for both.

Each stage is reusable and resumable from the workdir:
  <workdir>/config.json            the resolved config
  <workdir>/data/                  cached world splits (shapes)
  <workdir>/teachers/<name>/       frozen teachers (Orbax + recipe.json)
  <workdir>/checkpoints/<step>/    student train state (Orbax), resumed automatically
  <workdir>/metrics.jsonl          training metrics
  <workdir>/samples/               sample grids (PNG; prepared data: also the latents, .npz)
  <workdir>/curve.jsonl            held-out scores vs step (config.eval.curve_every > 0)
  <workdir>/scores.json            final ShapesBench scores (shapes), targets, wall times
  <workdir>/scores.md              the same as markdown tables (and the printout)
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from danceopd_jax.config import (
    config_errors,
    validate,
    validate_batch,
    world_kind,
)
from danceopd_jax.core.errors import ConfigError
from danceopd_jax.core.methods import get_method
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.data.batches import RouteBatcher
from danceopd_jax.eval import targets
from danceopd_jax.eval.shapesbench import markdown
from danceopd_jax.train import cluster
from danceopd_jax.train.checkpoint import RunCheckpoints
from danceopd_jax.train.events import Events
from danceopd_jax.train.lock import hold_workdir
from danceopd_jax.train.loop import MetricsWriter, every, fit
from danceopd_jax.train.mesh import batch_shards, make_mesh, to_host
from danceopd_jax.train.state import place_state, student_optimizer, student_rate
from danceopd_jax.train.student import (
    initial_trainable,
    merged_teachers,
    method_update,
    student_init,
    student_params_fn,
)
from danceopd_jax.worlds import build

log = logging.getLogger(__name__)


Params = Any


def main_job(config: ml_collections.ConfigDict, workdir: str | Path,
             coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> dict:
    """The main command: join the other processes of a multi-process run (train/cluster.py;
    a no-op for one process), then run."""
    with config_errors():
        cluster.initialize(coordinator, num_processes, process_id)
    return run(config, workdir)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train and score in `workdir`, which this job locks (train/lock.py); refuses at once a
    config, a batch or a step count that cannot work in it."""
    workdir = Path(workdir).absolute()
    validate(config)
    with config_errors():
        validate_batch(config, batch_shards(make_mesh(config.mesh)))
    workdir.mkdir(parents=True, exist_ok=True)
    with hold_workdir(workdir):
        check_steps(config, workdir)
        events = Events(workdir / "tensorboard") if jax.process_index() == 0 else None
        try:
            return _run(config, workdir, events)
        finally:
            if events:
                events.close()


def check_steps(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """A workdir whose checkpoint is past training.steps cannot be resumed to it."""
    if config.method == "weight_merge" or not (workdir / "checkpoints").is_dir():
        return
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    done = checkpoints.latest_step()
    checkpoints.close()
    if done is not None and done > config.training.steps:
        raise ConfigError(
            f"{workdir} already holds a checkpoint at step {done}, past "
            f"training.steps={config.training.steps}: nothing was run and its config.json is "
            f"unchanged. Pass --config.training.steps={done} or more to resume it, or use a new "
            "--workdir for a shorter run.")


def _run(config: ml_collections.ConfigDict, workdir: Path, events: Events | None) -> dict:
    world = build(config, workdir)
    routes, models = world.routes, world.models
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    mesh = make_mesh(config.mesh)
    log.info("%s world, mesh %s over %d process(es)", world_kind(config), dict(mesh.shape),
             jax.process_count())
    t0 = time.perf_counter()

    teachers, text = world.prepare_teachers(mesh)
    t_teachers = time.perf_counter() - t0

    tc, d = config.training, config.danceopd
    sigmas = make_sigmas(d.num_steps, d.shift, d.schedule)
    optimizer = student_optimizer(tc)
    student_params = student_params_fn(tc.lora_alpha or float(tc.lora_rank))
    names = sorted({r.teacher for r in routes} | {"anchor"})
    frozen = {"teachers": {n: teachers[n] for n in names}, "text": text}
    frozen_axes = {"teachers": {n: models.params_axes(teachers[n]) for n in names},
                   "text": models.text_axes}
    init = student_init(config, routes, teachers)
    if tc.lora_rank > 0:  # the LoRA's frozen base; a teacher's own arrays are placed once
        frozen["init"], frozen_axes["init"] = init, models.params_axes(init)
    trainable = initial_trainable(config, init, models.lora_targets)
    state, frozen, shardings = place_state(mesh, trainable, models.trainable_axes(trainable),
                                           frozen, frozen_axes, optimizer, tc.seed)
    checkpoints = RunCheckpoints(workdir / "checkpoints", tc.max_to_keep)
    if checkpoints.latest_step() is not None:
        state, _ = checkpoints.restore(state)
        log.info("student: resuming from checkpoint step %d", int(state.step))

    shards = batch_shards(mesh)
    batcher = RouteBatcher({r.bucket: world.train(r.bucket) for r in routes}, routes,
                           tc.routing, tc.batch_size, tc.seed, shards)
    samples = world.sampler(workdir / "samples")

    def save_samples(params: Params, text: Params, step: int) -> None:
        samples(params, text, step)
        if events:
            events.grids(workdir / "samples", step)

    def on_host(show):  # every process gathers the student; process 0 shows it
        return lambda s, n: show(to_host(student_params(s.eval_trainable(), frozen)),
                                 to_host(frozen["text"]), n)

    hooks = [(tc.sample_every, on_host(save_samples))]
    if config.eval.curve_every:
        curve = world.curve(workdir / "curve.jsonl", int(state.step))

        def record(params: Params, text: Params, step: int) -> None:
            row = curve(params, text, step)
            if events and row:
                events.scalars(step, {k: v for k, v in row.items()
                                      if k != "step" and v is not None}, "curve")

        hooks.append((config.eval.curve_every, on_host(record)))
        if int(state.step) == 0:
            on_host(record)(state, 0)  # the curve starts at the anchor
    on_interval, interval_every = every(*hooks)
    t1 = time.perf_counter()
    if get_method(config.method).train == "merge":  # no optimisation: the teachers' merge
        merged = {"backbone": merged_teachers(config, routes, frozen)}
        state = state.replace(trainable=merged, opt_state=optimizer.init(merged))  # and its EMA
        checkpoints.save(0, state, {"config": config.to_dict(), "step": 0})
        log.info("student: merged the teachers (%s), no training", config.baselines.merge)
    else:
        update = method_update(config, routes, models, student_params, optimizer, sigmas, shards,
                               shardings, frozen, world.bucket_has_source)
        state = fit(update, state, batcher, mesh, steps=tc.steps, name=config.method,
                    checkpoints=checkpoints, checkpoint_every=tc.checkpoint_every,
                    meta={"config": config.to_dict()},
                    metrics=MetricsWriter(workdir / "metrics.jsonl", student_rate(tc), events),
                    log_every=tc.log_every,
                    on_interval=on_interval, interval_every=interval_every,
                    max_param_growth=tc.get("max_param_growth", 0.0),
                    steps_per_call=tc.get("steps_per_call", 1))
    checkpoints.close()
    t_student = time.perf_counter() - t1

    student = to_host(student_params(state.eval_trainable(), frozen))
    if jax.process_index() != 0:  # process 0 samples, scores and writes the results
        return {}
    save_samples(student, text, int(state.step))
    # The reproduce command scores every run with ShapesBench itself (jobs/reproduce.py).
    t2 = time.perf_counter()
    scores = world.evaluate(teachers, student, text) if config.eval.final_scores else {}
    scores["wall_time_s"] = {"teachers": t_teachers, "distill": t_student,
                             "scores": time.perf_counter() - t2,
                             "total": time.perf_counter() - t0}
    (workdir / "scores.json").write_text(json.dumps(scores, indent=2))
    if events and "models" in scores:
        for model, report in scores["models"].items():
            values = {name: targets.score_of(report, name) for name in targets.SCORES}
            events.scalars(int(state.step), {k: v for k, v in values.items() if v is not None},
                           f"scores/{model}")
    wall = ", ".join(f"{k} {v:.0f} s" for k, v in scores["wall_time_s"].items())
    if "models" in scores:  # shapes: the small table of eval/targets.py, then the details
        (workdir / "scores.md").write_text(markdown(scores))
        split_edits = any(r.bucket in ("local_edit", "global_edit") for r in routes)
        print(f"{targets.summary(scores, scores['targets'], split_edits)}\n\nwall time: "
              f"{wall}; per category: {workdir / 'scores.md'}", flush=True)
    else:
        log.info("scores skipped; wall time: %s", wall)
    return scores

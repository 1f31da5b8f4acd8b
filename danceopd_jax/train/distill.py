"""The main job: world data -> teachers -> student (DanceOPD or a baseline) -> scores.

A world provides the data, the models and the teachers (ShapesWorld here, the default;
train/prepared.PreparedWorld for prepared data and diffusers teachers, config.world.kind =
"prepared"); the training loop, the step and the algorithm are the same for both.

Each stage is reusable and resumable from the workdir:
  <workdir>/config.json            the resolved config
  <workdir>/data/                  cached world splits (shapes)
  <workdir>/teachers/<name>/       frozen teachers (Orbax + recipe.json)
  <workdir>/checkpoints/<step>/    student train state (Orbax), resumed automatically
  <workdir>/metrics.jsonl          training metrics
  <workdir>/samples/               sample grids (shapes) or sampled latents (prepared)
  <workdir>/curve.jsonl            held-out scores vs step (config.eval.curve_every > 0)
  <workdir>/scores.json            final held-out scores (shapes), wall times
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from danceopd_jax.config import config_errors, routes_of, validate, validate_batch, world_kind
from danceopd_jax.core.fields import cfg
from danceopd_jax.core.methods import merge_coefficients, merge_weights
from danceopd_jax.core.routing import Route, validate_routes
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.data.batches import RouteBatcher, TrainBucket
from danceopd_jax.data.shapes import dataset
from danceopd_jax.data.shapes.tokenizer import encode, load_tokenizer
from danceopd_jax.errors import ConfigError
from danceopd_jax.eval.grids import save_grid
from danceopd_jax.eval.shapes import (
    Generators,
    edit_breakdown,
    generate_bucket,
    judge,
    make_generator,
    score_bucket,
)
from danceopd_jax.eval.shapesbench import Job, ShapesBench
from danceopd_jax.models import lora
from danceopd_jax.train.checkpoint import RunCheckpoints, load_params
from danceopd_jax.train.lock import hold_workdir
from danceopd_jax.train.loop import MetricsWriter, Update, every, fit
from danceopd_jax.train.mesh import batch_shards, make_mesh, to_host
from danceopd_jax.train.model import Models, count, init_models, student_params_fn
from danceopd_jax.train.state import place_state, student_optimizer
from danceopd_jax.train.step import (
    StudentParams,
    danceopd_objective,
    diffusion_opd_objective,
    flow_opd_objective,
    make_distill_step,
    make_flow_matching_step,
    off_policy_objective,
    soft_mix_objective,
)
from danceopd_jax.train.teachers import prepare_teachers

log = logging.getLogger(__name__)
Params = Any
GRID_ROWS = 8


class World:
    """The shapes world's splits for one config, built once and cached in the workdir."""

    def __init__(self, config: ml_collections.ConfigDict, cache_dir: Path):
        self.config, self.cache_dir = config, cache_dir
        self.tokenizer = load_tokenizer()

    @cache  # noqa: B019 - one World per run; buckets are large and immutable
    def train(self, bucket: str) -> dict[str, np.ndarray]:
        w = self.config.world
        return dataset.load_split("train", bucket, w.train_size, w.seed, w.image_size,
                                  self.cache_dir, self.tokenizer)

    @cache  # noqa: B019
    def heldout(self, bucket: str, num: int) -> dict[str, np.ndarray]:
        w = self.config.world
        return dataset.load_split("heldout", bucket, num, w.seed, w.image_size, self.cache_dir,
                                  self.tokenizer)

    def heldout_t2i(self) -> dict[str, np.ndarray]:
        """Held-out single-object prompts: every attribute (shape, colour, cell, background)
        is asked, so they measure the whole T2I capability."""
        b = self.heldout("t2i", 4 * self.config.eval.num_t2i)
        rows = np.flatnonzero(np.asarray(b["task"]).astype(str) == "single_object")
        return {k: v[rows[: self.config.eval.num_t2i]] for k, v in b.items()}


class Provider(Protocol):
    """What the main job needs from a world."""

    routes: list[Route]
    models: Models
    bucket_has_source: dict[str, bool]  # whether a bucket's rows carry source images

    def prepare_teachers(self, mesh: Mesh) -> tuple[dict[str, Params], Params]:
        """({teacher name: backbone params}, the frozen "text" params), made or reused."""

    def load_anchor(self) -> tuple[Params, Params]:
        """The anchor's params and the frozen "text" params, from the workdir only."""

    def train(self, bucket: str) -> TrainBucket:
        """A bucket's training rows."""

    def sampler(self, out_dir: Path) -> Callable[[Params, Params, int], None]:
        """(student params, text params, step) -> writes the student's samples."""

    def curve(self, path: Path, start: int) -> Callable[[Params, Params, int], None]:
        """(student params, text params, step) -> appends quick held-out scores to `path`
        (rows after step `start` are dropped first: a resumed run scores them again)."""

    def evaluate(self, teachers: dict[str, Params], student: Params, text: Params) -> dict:
        """Held-out scores of the teachers and the student."""


class ShapesWorld:
    """The embedded shapes world: its splits, the tiny MMDiT and text encoder freshly
    initialised, teachers trained by flow matching (or reused), parser-scored evaluation."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
        self.config, self.workdir = config, workdir
        self.routes = routes_of(config)
        self.bucket_has_source = dataset.BUCKET_HAS_SOURCE
        validate_routes(self.routes, {n: t.kind for n, t in config.teachers.items()},
                        self.bucket_has_source)
        self.splits = World(config, workdir / "data")
        tok = self.tokenizer
        null_ids, null_mask = encode(tok, [""])
        self.models, self.init_backbone, self.init_text = init_models(
            config, len(tok), tok.eos_token_id, null_ids, null_mask, config.seed)
        log.info("backbone %d params, text encoder %d params", count(self.init_backbone),
                 count(self.init_text))

    @property
    def tokenizer(self):
        return self.splits.tokenizer

    def prepare_teachers(self, mesh: Mesh) -> tuple[dict[str, Params], Params]:
        return prepare_teachers(self.config, self.routes, self.models, self.init_backbone,
                                self.init_text, self.splits.train, mesh, self.workdir)

    def load_anchor(self) -> tuple[Params, Params]:
        anchor, _ = load_params(self.workdir / "teachers" / "anchor",
                                {"backbone": self.init_backbone, "text": self.init_text})
        return anchor["backbone"], anchor["text"]

    def train(self, bucket: str) -> TrainBucket:
        return self.splits.train(bucket)

    def sampler(self, out_dir: Path) -> Callable[[Params, Params, int], None]:
        return SampleGrids(self.config, self.models, self.splits, self.routes, out_dir).save

    def curve(self, path: Path, start: int) -> Callable[[Params, Params, int], None]:
        return Curve(self.config, self.models, self.splits, self.routes, path, start).record

    def evaluate(self, teachers: dict[str, Params], student: Params, text: Params) -> dict:
        return evaluate(self.config, self.models, self.splits, self.routes, teachers, student,
                        text)


def build(config: ml_collections.ConfigDict, workdir: Path) -> Provider:
    """Validate the config and build the run's world (nothing loaded into it or compiled);
    a config it cannot be built from raises ConfigError."""
    validate(config)
    with config_errors():
        if world_kind(config) == "prepared":
            from danceopd_jax.train.prepared import PreparedWorld  # tfds, only when needed

            return PreparedWorld(config, workdir)
        return ShapesWorld(config, workdir)


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
        return _run(config, workdir)


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


def _run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
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
    student_params = student_params_fn("anchor", tc.lora_alpha or float(tc.lora_rank))
    names = sorted({r.teacher for r in routes} | {"anchor"})
    frozen = {"teachers": {n: teachers[n] for n in names}, "text": text}
    frozen_axes = {"teachers": {n: models.params_axes(teachers[n]) for n in names},
                   "text": models.text_axes}
    trainable = initial_trainable(config, frozen)
    state, frozen, shardings = place_state(mesh, trainable, models.trainable_axes(trainable),
                                           frozen, frozen_axes, optimizer, tc.seed)
    checkpoints = RunCheckpoints(workdir / "checkpoints", tc.max_to_keep)
    if checkpoints.latest_step() is not None:
        state, _ = checkpoints.restore(state)
        log.info("student: resuming from checkpoint step %d", int(state.step))

    shards = batch_shards(mesh)
    batcher = RouteBatcher({r.bucket: world.train(r.bucket) for r in routes}, routes,
                           tc.routing, tc.batch_size, tc.seed, shards)
    save_samples = world.sampler(workdir / "samples")

    def on_host(show):  # every process gathers the student; process 0 shows it
        return lambda s, n: show(to_host(student_params(s.trainable, frozen)),
                                 to_host(frozen["text"]), n)

    hooks = [(tc.sample_every, on_host(save_samples))]
    if config.eval.curve_every:
        record = world.curve(workdir / "curve.jsonl", int(state.step))
        hooks.append((config.eval.curve_every, on_host(record)))
        if int(state.step) == 0:
            on_host(record)(state, 0)  # the curve starts at the anchor
    on_interval, interval_every = every(*hooks)
    t1 = time.perf_counter()
    if config.method == "weight_merge":  # no optimisation: the student is the teachers' merge
        state = state.replace(trainable={"backbone": merged_teachers(config, routes, frozen)})
        checkpoints.save(0, state, {"config": config.to_dict(), "step": 0})
        log.info("student: merged the teachers (%s), no training", config.baselines.merge)
    else:
        update = method_update(config, routes, models, student_params, optimizer, sigmas, shards,
                               shardings, frozen, world.bucket_has_source)
        state = fit(update, state, batcher, mesh, steps=tc.steps, name=config.method,
                    checkpoints=checkpoints, checkpoint_every=tc.checkpoint_every,
                    meta={"config": config.to_dict()},
                    metrics=MetricsWriter(workdir / "metrics.jsonl"), log_every=tc.log_every,
                    on_interval=on_interval, interval_every=interval_every,
                    max_param_growth=tc.get("max_param_growth", 0.0))
    checkpoints.close()
    t_student = time.perf_counter() - t1

    student = to_host(student_params(state.trainable, frozen))
    if jax.process_index() != 0:  # process 0 samples, scores and writes the results
        return {}
    save_samples(student, text, int(state.step))
    # The reproduce command scores every run with ShapesBench itself (train/experiments.py).
    scores = world.evaluate(teachers, student, text) if config.eval.final_scores else {}
    scores["wall_time_s"] = {"teachers": t_teachers, "distill": t_student,
                             "total": time.perf_counter() - t0}
    (workdir / "scores.json").write_text(json.dumps(scores, indent=2))
    log.info("%s:\n%s", "scores" if config.eval.final_scores else "scores skipped",
             format_scores(scores))
    return scores


def method_update(config: ml_collections.ConfigDict, routes: list[Route], models: Models,
                  student_params: StudentParams, optimizer, sigmas: jax.Array, shards: int,
                  shardings, frozen: Params, bucket_has_source: dict[str, bool]) -> Update:
    """The student's update for config.method (README "Methods"): (state, batch, slots) ->
    (state, metrics), the same optimizer and batches for every method."""
    d, b = config.danceopd, config.baselines
    field = models.field()
    if config.method == "sft_mix":  # flow matching on the routed batch's ground truth
        fm_step = make_flow_matching_step(field, student_params, models.conditioner(), optimizer,
                                          shardings=shardings)
        return lambda state, batch, slots: fm_step(state, frozen, batch)
    fields = [cfg(field, r.cfg_alpha) for r in routes]
    match config.method:
        case "danceopd":
            objective = danceopd_objective(field, fields, sigmas, d.query_k, d.query_bias,
                                           shards, d.full_rollout, d.shared_query)
        case "diffusion_opd":
            objective = diffusion_opd_objective(field, fields, sigmas, b.dsigma, shards)
        case "flow_opd":
            objective = flow_opd_objective(field, fields, sigmas, b.group, b.eta, b.ppo_clip,
                                           b.adv_clip, b.advantage, shards)
        case "off_policy":  # T2I buckets have no source: their endpoints are teacher samples
            endpoint = [not bucket_has_source[r.bucket] for r in routes]
            objective = off_policy_objective(field, fields, endpoint, sigmas, d.query_k,
                                             d.query_bias, shards)
        case "soft_mix":
            objective = soft_mix_objective(field, fields, [r.weight for r in routes], sigmas,
                                           d.query_k, d.query_bias, shards, d.full_rollout)
        case _:
            raise ValueError(f"method {config.method!r} has no training step (weight_merge "
                             "trains nothing; run() merges the teachers instead).")
    step = make_distill_step(objective, student_params, [r.teacher for r in routes],
                             models.conditioner(), optimizer, shardings)
    return lambda state, batch, slots: step(state, frozen, batch, slots)


def merged_teachers(config: ml_collections.ConfigDict, routes: list[Route],
                    frozen: Params) -> Params:
    """The weight-merging student: anchor + sum_m lambda_m (teacher_m - anchor)."""
    b, teachers = config.baselines, frozen["teachers"]
    coefficients = merge_coefficients(routes, b.merge, b.merge_scale)
    return merge_weights(teachers["anchor"], [lora.resolve(teachers[n]) for n in coefficients],
                         list(coefficients.values()))


def initial_trainable(config: ml_collections.ConfigDict, frozen: Params) -> Params:
    """The student starts at the anchor: LoRA factors with a zero delta, or a full copy."""
    tc = config.training
    anchor = frozen["teachers"]["anchor"]
    if tc.lora_rank > 0:
        return {"lora": lora.init_lora(jax.random.key(tc.seed), anchor, tc.lora_rank)}
    return {"backbone": jax.tree.map(jnp.copy, anchor)}  # donated by the step: never alias


class SampleGrids:
    """Fixed held-out prompts and edits, sampled with the student at intervals."""

    def __init__(self, config, models: Models, world: World, routes, out_dir: Path):
        self.out_dir, self.seed = out_dir, config.seed
        sigmas = make_sigmas(config.eval.sample_steps, config.danceopd.shift,
                             config.danceopd.schedule)
        self.generate = make_generator(models.field(), models.conditioner(), sigmas)
        buckets = {r.bucket for r in routes} | {"t2i"}
        self.buckets = {b: _head(world.heldout(b, config.eval.num_edit), GRID_ROWS)
                        for b in sorted(buckets)}

    def save(self, params: Params, text: Params, step: int) -> None:
        if jax.process_index() != 0:
            return
        for name, bucket in self.buckets.items():
            images = generate_bucket(self.generate, params, text, bucket, self.seed, GRID_ROWS)
            prompts = _prompts(bucket)
            if name == "t2i":
                rows = [[t, g] for t, g in zip(bucket["target"], images, strict=True)]
                header = "ground truth | student"
            else:
                rows = [[s, t, g] for s, t, g in zip(bucket["source"], bucket["target"], images,
                                                     strict=True)]
                header = "source | target | student"
            save_grid(self.out_dir / f"{name}_step{step:06d}.png", rows, prompts,
                      f"{name} @ step {step}: {header}")


class Curve:
    """Quick held-out ShapesBench scores of the student during distillation, appended to
    `path` (curve.jsonl) by process 0 as {"step", "t2i": the GenEval-style mean, "edit": the
    GEditBench-style combined mean, null when no route trains edits}, for score-vs-step plots.
    Sampled like the final scores (config.eval.sample_steps, the run's seed) on
    config.eval.curve_num prompts / edits per category."""

    def __init__(self, config, models: Models, world: World, routes, path: Path, start: int):
        self.path, self.seed = path, config.seed
        edits = any(dataset.BUCKET_HAS_SOURCE[r.bucket] for r in routes)
        self.tasks = ("t2i", "edit") if edits else ("t2i",)
        self.bench = None
        if config.eval.curve_every and jax.process_index() == 0:
            e = config.eval
            self.bench = ShapesBench(config, models, world, sample_steps=e.sample_steps,
                                     num=e.curve_num, batch_size=e.batch_size)
            if path.exists():  # a resumed run scores the steps after `start` again
                rows = [r for r in path.read_text().splitlines() if json.loads(r)["step"] <= start]
                path.write_text("".join(f"{r}\n" for r in rows))

    def record(self, params: Params, text: Params, step: int) -> None:
        if self.bench is None:
            return
        scores = self.bench.score(Job("student", params, tasks=self.tasks), text, self.seed)
        row = {"step": step, "t2i": scores["t2i"]["mean"],
               "edit": scores["edit"]["mean"]["correct"] if "edit" in scores else None}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def evaluate(config, models: Models, world: World, routes, teachers: dict[str, Params],
             student: Params, text: Params) -> dict:
    """Held-out scores of the anchor, each routed teacher (with its CFG) and the student
    (single pass, no CFG) on T2I single-object prompts and on each route's bucket."""
    jobs = [("anchor", teachers["anchor"], "t2i", 1.0)]
    jobs += [(r.teacher, teachers[r.teacher], r.bucket, r.cfg_alpha) for r in routes]
    jobs += [("student", student, b, 1.0) for b in ["t2i", *(r.bucket for r in routes)]]
    return score_models(config, models, world, text, jobs)


def score_models(config, models: Models, world: World, text: Params,
                 jobs: list[tuple[str, Params, str, float]]) -> dict:
    """{model: {"<bucket>@cfg<alpha>": scores}} for (model name, params, bucket, CFG alpha)
    jobs, each sampled deterministically on the bucket's held-out evaluation set; plus
    "edit_breakdown": {model: {eval set: {edit kind: changed / preserved / correct}}}."""
    e, d = config.eval, config.danceopd
    generators = Generators(models.field(), models.conditioner(),
                            make_sigmas(e.sample_steps, d.shift, d.schedule))
    results: dict[str, dict] = {}
    breakdown: dict[str, dict] = {}
    for name, params, bucket, alpha in jobs:
        key = f"{bucket}@cfg{alpha:g}"
        if key in results.setdefault(name, {}):
            continue
        data = world.heldout_t2i() if bucket == "t2i" else world.heldout(bucket, e.num_edit)
        images = generate_bucket(generators(alpha), params, text, data, config.seed,
                                 e.batch_size)
        verdicts = judge(images, data)
        results[name][key] = score_bucket(verdicts)
        if bucket != "t2i":
            breakdown.setdefault(name, {})[key] = edit_breakdown(verdicts)
    return {**results, "edit_breakdown": breakdown}


def format_scores(scores: dict) -> str:
    lines = [f"{'model':<14}{'eval set':<20}score   per task"]
    for model, sets in scores.items():
        if model in ("wall_time_s", "edit_breakdown"):
            continue
        for name, s in sets.items():
            tasks = ", ".join(f"{k} {v:.2f}" for k, v in s.items() if k != "score")
            lines.append(f"{model:<14}{name:<20}{s['score']:.3f}   {tasks}")
    for model, sets in scores.get("edit_breakdown", {}).items():
        for name, kinds in sets.items():
            lines.append(f"{model} on {name}, per edit kind (changed / preserved / correct): "
                         + ", ".join(f"{kind} {r['changed']:.2f}/{r['preserved']:.2f}/"
                                     f"{r['correct']:.2f}" for kind, r in kinds.items()))
    w = scores.get("wall_time_s", {})
    if w:
        lines.append("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in w.items()))
    return "\n".join(lines)


def _head(bucket: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in bucket.items()}


def _prompts(bucket: dict[str, np.ndarray]) -> list[str]:
    return [json.loads(str(s))["text"] for s in bucket["spec"]]

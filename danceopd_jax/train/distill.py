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
  <workdir>/samples/               sample grids (PNG; prepared data: also the latents, .npz)
  <workdir>/curve.jsonl            held-out scores vs step (config.eval.curve_every > 0)
  <workdir>/scores.json            final ShapesBench scores (shapes), targets, wall times
  <workdir>/scores.md              the same as markdown tables (and the printout)
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
from jax.tree_util import keystr, tree_flatten_with_path

from danceopd_jax.config import (
    config_errors,
    init_teacher,
    routes_of,
    teacher_buckets,
    validate,
    validate_batch,
    world_kind,
)
from danceopd_jax.core.errors import ConfigError
from danceopd_jax.core.fields import cfg
from danceopd_jax.core.methods import Setting, get_method, merge_coefficients, merge_weights
from danceopd_jax.core.routing import Route, validate_routes
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.data.batches import RouteBatcher, TrainBucket
from danceopd_jax.data.shapes import dataset
from danceopd_jax.data.shapes.tokenizer import encode, load_tokenizer
from danceopd_jax.eval import targets
from danceopd_jax.eval.grids import save_grid
from danceopd_jax.eval.shapes import generate_bucket, make_generator
from danceopd_jax.eval.shapesbench import Job, ShapesBench, markdown, teacher_tasks
from danceopd_jax.models import lora
from danceopd_jax.train.checkpoint import RunCheckpoints, load_params
from danceopd_jax.train.events import Events
from danceopd_jax.train.lock import hold_workdir
from danceopd_jax.train.loop import MetricsWriter, Update, every, fit
from danceopd_jax.train.mesh import batch_shards, make_mesh, to_host
from danceopd_jax.train.model import Models, count, init_models, student_params_fn
from danceopd_jax.train.state import place_state, student_optimizer, student_rate
from danceopd_jax.train.step import StudentParams, make_distill_step, make_flow_matching_step
from danceopd_jax.train.teachers import prepare_teachers, shipped_dir

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


class Provider(Protocol):
    """What the main job needs from a world."""

    routes: list[Route]
    models: Models
    bucket_has_source: dict[str, bool]  # whether a bucket's rows carry source images

    def prepare_teachers(self, mesh: Mesh) -> tuple[dict[str, Params], Params]:
        """({teacher name: backbone params}, the frozen "text" params), made or reused."""

    def load_anchor(self) -> tuple[Params, Params]:
        """The anchor's params and the frozen "text" params, from the workdir only."""

    def load_teachers(self, names: list[str]) -> tuple[dict[str, Params], Params]:
        """({name: params} of the anchor, `names` and what they need, the frozen "text"
        params), from the workdir only."""

    def train(self, bucket: str) -> TrainBucket:
        """A bucket's training rows."""

    def sampler(self, out_dir: Path) -> Callable[[Params, Params, int], None]:
        """(student params, text params, step) -> writes the student's samples."""

    def curve(self, path: Path, start: int) -> Callable[[Params, Params, int], dict | None]:
        """(student params, text params, step) -> appends quick held-out scores to `path` and
        returns that row (rows after step `start` are dropped first: a resumed run scores them
        again)."""

    def evaluate(self, teachers: dict[str, Params], student: Params, text: Params) -> dict:
        """Held-out scores of the teachers and the student (shapes: a ShapesBench report with
        the verdicts on the config's targets, "targets")."""


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
                                self.init_text, self.splits.train, mesh, self.workdir,
                                shipped_dir(self.config))

    def load_anchor(self) -> tuple[Params, Params]:
        anchor, _ = load_params(self.workdir / "teachers" / "anchor",
                                {"backbone": self.init_backbone, "text": self.init_text})
        return anchor["backbone"], anchor["text"]

    def load_teachers(self, names: list[str]) -> tuple[dict[str, Params], Params]:
        anchor, text = self.load_anchor()
        teachers = {"anchor": anchor}
        for name in names:
            if name not in teachers:
                params, _ = load_params(self.workdir / "teachers" / name,
                                        {"backbone": self.init_backbone})
                teachers[name] = params["backbone"]
        return teachers, text

    def train(self, bucket: str) -> TrainBucket:
        return self.splits.train(bucket)

    def sampler(self, out_dir: Path) -> Callable[[Params, Params, int], None]:
        return SampleGrids(self.config, self.models, self.splits, self.routes, out_dir).save

    def curve(self, path: Path, start: int) -> Callable[[Params, Params, int], dict | None]:
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
    trainable = initial_trainable(config, init)
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
                    max_param_growth=tc.get("max_param_growth", 0.0))
    checkpoints.close()
    t_student = time.perf_counter() - t1

    student = to_host(student_params(state.eval_trainable(), frozen))
    if jax.process_index() != 0:  # process 0 samples, scores and writes the results
        return {}
    save_samples(student, text, int(state.step))
    # The reproduce command scores every run with ShapesBench itself (train/experiments.py).
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


def method_update(config: ml_collections.ConfigDict, routes: list[Route], models: Models,
                  student_params: StudentParams, optimizer, sigmas: jax.Array, shards: int,
                  shardings, frozen: Params, bucket_has_source: dict[str, bool]) -> Update:
    """The student's update for config.method (its record in the method registry): (state,
    batch, slots) -> (state, metrics), the same optimizer and batches for every method."""
    method = get_method(config.method)
    field = models.field()
    if method.train == "flow_matching":  # on the routed batch's ground truth
        fm_step = make_flow_matching_step(field, student_params, models.conditioner(), optimizer,
                                          shardings=shardings)
        return lambda state, batch, slots: fm_step(state, frozen, batch)
    if method.train != "distill":
        raise ValueError(f"method {config.method!r} has no training step ({method.train}: "
                         "run() builds the student without optimisation).")
    objective = method.objective(Setting(
        field, [cfg(field, r.cfg_alpha) for r in routes], routes,
        [bucket_has_source[r.bucket] for r in routes], sigmas, shards,
        config.danceopd.to_dict(), config.baselines.to_dict()))
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


def init_sources(config: ml_collections.ConfigDict, routes: list[Route]) -> list[str]:
    """The teachers student_init reads."""
    name = init_teacher(config)
    return ["anchor", *(r.teacher for r in routes)] if name is None else [name]


def student_init(config: ml_collections.ConfigDict, routes: list[Route],
                 teachers: dict[str, Params]) -> Params:
    """The weights the student starts from (training.init): a teacher's own params (the
    anchor's by default; a LoRA teacher's are lora.adapted), or the routed teachers' weight
    merge, made as the weight_merge baseline makes it (config.baselines.merge)."""
    name = init_teacher(config)
    if name is None:
        return merged_teachers(config, routes, {"teachers": teachers})
    return teachers[name]


def initial_trainable(config: ml_collections.ConfigDict, init: Params) -> Params:
    """The student at `init` (student_init): a full copy, or LoRA factors with a zero delta
    plus copies of the base params it trains in full (training.lora_full) under "full"."""
    tc = config.training
    weights = lora.resolve(init)

    def copy(tree: Params) -> Params:
        return jax.tree.map(jnp.copy, tree)  # donated by the step: never alias the base

    if tc.lora_rank <= 0:
        return {"backbone": copy(weights)}
    factors = lora.init_lora(jax.random.key(tc.seed), weights, tc.lora_rank)
    pattern = tc.get("lora_full", "")  # a workdir's config.json from before it: none
    full = lora.select(weights, pattern)
    if pattern and not full:
        raise ValueError(f"training.lora_full={pattern!r} matches no param of the backbone; "
                         f"fix the regex (top-level params: {sorted(weights)}), or set it to "
                         "'' to train only the LoRA factors.")
    both = {keystr(p[:-1]) for p, _ in tree_flatten_with_path(factors)[0]} & {
        keystr(p) for p, _ in tree_flatten_with_path(full)[0]}
    if both:
        raise ValueError(f"training.lora_full={pattern!r} selects kernels that LoRA already "
                         f"adapts ({sorted(both)[:4]}); narrow the regex to params LoRA leaves "
                         "frozen (e.g. source_embed, biases, norms).")
    return {"lora": factors, **({"full": copy(full)} if full else {})}


class SampleGrids:
    """Fixed held-out prompts and edits, sampled with the student at intervals."""

    def __init__(self, config, models: Models, world: World, routes, out_dir: Path):
        self.out_dir, self.seed = out_dir, config.seed
        sigmas = make_sigmas(config.eval.sample_steps, config.danceopd.shift,
                             config.danceopd.schedule)
        self.generate = make_generator(models.field(), models.conditioner(), sigmas)
        buckets = {r.bucket for r in routes} | {"t2i"}
        self.buckets = {b: world.heldout(b, GRID_ROWS) for b in sorted(buckets)}

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
    Sampled with the final scores' steps (config.eval.sample_steps), one seed (config.seed),
    on config.eval.curve_num prompts / edits per category."""

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

    def record(self, params: Params, text: Params, step: int) -> dict | None:
        """The row appended (None on the other processes)."""
        if self.bench is None:
            return None
        scores = self.bench.score(Job("student", params, tasks=self.tasks), text, self.seed)
        row = {"step": step, "t2i": scores["t2i"]["mean"],
               "edit": scores["edit"]["mean"]["correct"] if "edit" in scores else None}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def evaluate(config, models: Models, world: World, routes, teachers: dict[str, Params],
             student: Params, text: Params) -> dict:
    """The ShapesBench report (eval/shapesbench.py) of score_jobs' models on
    config.eval.num held-out prompts / edits per category and config.eval.seeds, sampled with
    config.eval.sample_steps, and "targets": the verdicts on config.eval.targets."""
    e = config.eval
    bench = ShapesBench(config, models, world, sample_steps=e.sample_steps, num=e.num,
                        batch_size=e.batch_size)
    report = bench.evaluate(text, score_jobs(config, routes, teachers, student),
                            tuple(e.seeds))
    report["targets"] = targets.check(report, e.targets)
    return report


def score_jobs(config, routes, teachers: dict[str, Params], student: Params) -> list[Job]:
    """The anchor, each routed teacher (at each CFG scale it is routed with; "name@cfgA"
    when A != 1) and the student (single pass, no CFG). A teacher is scored on what its
    recipe trains (teacher_tasks) and on what a target compares it on; the student on T2I
    and, when a route trains edits, on edits."""
    needs: dict[str, set[str]] = {}
    for t in config.eval.targets.values():
        needs.setdefault(t.reference, set()).add(targets.SCORES[t.score][0])
    wanted = {("anchor", 1.0): None, **{(r.teacher, r.cfg_alpha): None for r in routes},
              **{(name, 1.0): None for name in needs}}
    jobs = []
    for name, alpha in wanted:
        own = teacher_tasks(list(teacher_buckets(config.teachers[name])))
        tasks = tuple(t for t in ("t2i", "edit") if t in {*own, *needs.get(name, ())})
        jobs.append(Job(name if alpha == 1.0 else f"{name}@cfg{alpha:g}", teachers[name],
                        alpha, tasks))
    edits = any(dataset.BUCKET_HAS_SOURCE[r.bucket] for r in routes)
    return [*jobs, Job(targets.STUDENT, student, 1.0, ("t2i", "edit") if edits else ("t2i",))]


def _prompts(bucket: dict[str, np.ndarray]) -> list[str]:
    return [json.loads(str(s))["text"] for s in bucket["spec"]]

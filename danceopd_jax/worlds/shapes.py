"""The embedded shapes world: its train and held-out splits (cached in the workdir), the tiny
MMDiT and text encoder freshly initialised, teachers trained by flow matching or shipped with
the package (train/teachers.py), sample grids, the training curve and the final ShapesBench
scores."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from danceopd_jax.config import (
    routes_of,
    teacher_buckets,
)
from danceopd_jax.core.routing import validate_routes
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.data.batches import TrainBucket
from danceopd_jax.data.shapes import dataset
from danceopd_jax.data.shapes.dataset import Splits
from danceopd_jax.data.shapes.tokenizer import encode
from danceopd_jax.data.store import load_params
from danceopd_jax.eval import targets
from danceopd_jax.eval.grids import save_grid
from danceopd_jax.eval.shapes import generate_bucket, make_generator
from danceopd_jax.eval.shapesbench import Job, ShapesBench, teacher_tasks
from danceopd_jax.models.wiring import Models, count, init_models
from danceopd_jax.train.teachers import prepare_teachers, shipped_dir

log = logging.getLogger(__name__)


Params = Any


GRID_ROWS = 8


def student_tasks(routes) -> tuple[str, ...]:
    """What the student is scored on: T2I, and edits when a route reads a bucket with source
    images."""
    edits = any(dataset.BUCKET_HAS_SOURCE[r.bucket] for r in routes)
    return ("t2i", "edit") if edits else ("t2i",)


def validate_edit_targets(config: ml_collections.ConfigDict, routes) -> None:
    """Targets on edit scores need a route that trains edits: without one the student is not
    scored on them."""
    if "edit" in student_tasks(routes):
        return
    for name, t in config.eval.get("targets", {}).items():  # none in older workdirs' configs
        if targets.SCORES[t.score][0] == "edit":
            raise ValueError(
                f"config.eval.targets.{name} compares edit scores, but no route reads an edit "
                f"bucket (routes read {sorted({r.bucket for r in routes})}), so the student is "
                "not scored on edits; remove that target from the config file or route an edit "
                "bucket.")


class ShapesWorld:
    """The embedded shapes world: its splits, the tiny MMDiT and text encoder freshly
    initialised, teachers trained by flow matching (or reused), parser-scored evaluation."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
        self.config, self.workdir = config, workdir
        self.routes = routes_of(config)
        self.bucket_has_source = dataset.BUCKET_HAS_SOURCE
        validate_routes(self.routes, {n: t.kind for n, t in config.teachers.items()},
                        self.bucket_has_source)
        validate_edit_targets(config, self.routes)
        self.splits = Splits(config, workdir / "data")
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


class SampleGrids:
    """Fixed held-out prompts and edits, sampled with the student at intervals."""

    def __init__(self, config, models: Models, world: Splits, routes, out_dir: Path):
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

    def __init__(self, config, models: Models, world: Splits, routes, path: Path, start: int):
        self.path, self.seed = path, config.seed
        self.tasks = student_tasks(routes)
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


def evaluate(config, models: Models, world: Splits, routes, teachers: dict[str, Params],
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
    return [*jobs, Job(targets.STUDENT, student, 1.0, student_tasks(routes))]


def _prompts(bucket: dict[str, np.ndarray]) -> list[str]:
    return [json.loads(str(s))["text"] for s in bucket["spec"]]

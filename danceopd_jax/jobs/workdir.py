"""A trained workdir's student (restored from its latest checkpoint) and teachers: what the
sample, evaluate, reproduce and export commands read."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ml_collections
from flax import nnx

from danceopd_jax.core.errors import CheckpointError
from danceopd_jax.data.store import key_of, load_params
from danceopd_jax.models.wiring import Models
from danceopd_jax.train.checkpoint import RunCheckpoints
from danceopd_jax.train.state import TrainState, student_optimizer
from danceopd_jax.train.student import (
    init_sources,
    initial_trainable,
    student_init,
    student_params_fn,
)
from danceopd_jax.train.teachers import saved_with_text
from danceopd_jax.worlds import World, build

Params = Any


@dataclass(frozen=True)
class Workdir:
    """A main-job workdir's config, world and frozen models: what scoring its teachers needs,
    before (or without) a trained student."""

    config: ml_collections.ConfigDict
    world: World
    models: Models
    text: Params  # the frozen text encoder
    teachers: dict[str, Params]  # the backbones loaded so far: always the anchor

    @property
    def anchor(self) -> Params:  # the frozen anchor teacher's backbone
        return self.teachers["anchor"]


@dataclass(frozen=True, kw_only=True)
class Student(Workdir):
    """A workdir's trained student and what running or exporting it needs."""

    params: Params  # the student's backbone params (a LoRA student's merged onto its base)
    lora: Params | None  # the trained LoRA tree; None for full fine-tuning
    lora_alpha: float
    full: Params | None = None  # the base params a LoRA student trained in full

    @property
    def backbone_config(self) -> Any:  # its family's config (models/contract.py)
        return nnx.merge(self.models.backbone, self.params).config


def open_workdir(workdir: str | Path) -> Workdir:
    """A ``danceopd_jax.main`` workdir's config (``config.json``), world, text encoder and
    anchor, without its student."""
    workdir = Path(workdir).absolute()
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{workdir} has no config.json; is it a danceopd_jax.main workdir?")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    world = build(config, workdir)
    loaded, text = world.load_teachers([])
    return Workdir(config, world, world.models, text, loaded)


def load_student(workdir: str | Path, run: Workdir | None = None) -> Student:
    """The student of a ``danceopd_jax.main`` workdir at its latest checkpoint (from
    ``config.json``, ``checkpoints/`` and the teachers under ``teachers/``): its moving
    average when it kept one (training.ema_decay > 0). `run`: the workdir, if already open."""
    workdir = Path(workdir).absolute()
    run = run or open_workdir(workdir)
    config, tc = run.config, run.config.training
    if tc.lora_rank > 0:  # a LoRA student's base: the weights it started from
        loaded, _ = run.world.load_teachers(init_sources(config, run.world.routes))
        run = replace(run, teachers=loaded)
        init = student_init(config, run.world.routes, run.teachers)
    else:  # the checkpoint holds the whole student; the anchor gives its shapes
        init = run.anchor
    like = TrainState.create(initial_trainable(config, init, run.models.lora_targets),
                             student_optimizer(tc), tc.seed)
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    state, _ = checkpoints.restore(like)
    checkpoints.close()
    alpha = tc.lora_alpha or float(tc.lora_rank)
    trainable = state.eval_trainable()
    return Student(**vars(run), params=student_params_fn(alpha)(trainable, {"init": init}),
                   lora=trainable.get("lora"), lora_alpha=alpha, full=trainable.get("full"))


def load_teacher(workdir: str | Path, run: Workdir, name: str) -> tuple[Params, dict]:
    """Teacher `name`'s backbone params from ``<workdir>/teachers/<name>/`` and its recipe
    (``data.store.key_of(recipe)["teacher"]`` is its config entry)."""
    teachers = Path(workdir).absolute() / "teachers"
    if not (teachers / name / "recipe.json").is_file():
        have = sorted(p.name for p in teachers.glob("*") if (p / "recipe.json").is_file())
        raise CheckpointError(f"{teachers} has no teacher {name!r}; it has {have}.")
    entry = key_of(json.loads((teachers / name / "recipe.json").read_text()))["teacher"]
    like = {"backbone": run.anchor,
            **({"text": run.text} if saved_with_text(name, entry) else {})}
    params, recipe = load_params(teachers / name, like)
    return params["backbone"], recipe

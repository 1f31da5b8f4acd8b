"""A trained workdir's student (restored from its latest checkpoint) and teachers: what the
sample, evaluate, reproduce and export commands read."""

from __future__ import annotations

import json
from dataclasses import dataclass
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
class Student:
    """A workdir's trained student and what running or exporting it needs."""

    config: ml_collections.ConfigDict
    world: World
    models: Models
    params: Params  # the student's backbone params (a LoRA student's merged onto its base)
    text: Params  # the frozen text encoder
    anchor: Params  # the frozen anchor teacher's backbone
    lora: Params | None  # the trained LoRA tree; None for full fine-tuning
    lora_alpha: float
    full: Params | None = None  # the base params a LoRA student trained in full

    @property
    def backbone_config(self) -> Any:  # its family's config (models/contract.py)
        return nnx.merge(self.models.backbone, self.params).config


def load_student(workdir: str | Path) -> Student:
    """The student of a ``danceopd_jax.main`` workdir at its latest checkpoint (from
    ``config.json``, ``checkpoints/`` and the teachers under ``teachers/``): its moving
    average when it kept one (training.ema_decay > 0)."""
    workdir = Path(workdir).absolute()
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{workdir} has no config.json; is it a danceopd_jax.main workdir?")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    world = build(config, workdir)
    tc = config.training
    if tc.lora_rank > 0:  # a LoRA student's base: the weights it started from
        teachers, text = world.load_teachers(init_sources(config, world.routes))
        init = student_init(config, world.routes, teachers)
    else:  # the checkpoint holds the whole student; the anchor gives its shapes
        teachers, text = world.load_teachers([])
        init = teachers["anchor"]
    optimizer = student_optimizer(tc)
    like = TrainState.create(initial_trainable(config, init, world.models.lora_targets),
                             optimizer, tc.seed)
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    state, _ = checkpoints.restore(like)
    checkpoints.close()
    alpha = tc.lora_alpha or float(tc.lora_rank)
    trainable = state.eval_trainable()
    params = student_params_fn(alpha)(trainable, {"init": init})
    return Student(config, world, world.models, params, text, teachers["anchor"],
                   trainable.get("lora"), alpha, trainable.get("full"))


def load_teacher(workdir: str | Path, student: Student, name: str) -> tuple[Params, dict]:
    """Teacher `name`'s backbone params from ``<workdir>/teachers/<name>/`` and its recipe
    (``data.store.key_of(recipe)["teacher"]`` is its config entry)."""
    teachers = Path(workdir).absolute() / "teachers"
    if not (teachers / name / "recipe.json").is_file():
        have = sorted(p.name for p in teachers.glob("*") if (p / "recipe.json").is_file())
        raise CheckpointError(f"{teachers} has no teacher {name!r}; it has {have}.")
    entry = key_of(json.loads((teachers / name / "recipe.json").read_text()))["teacher"]
    like = {"backbone": student.anchor,
            **({"text": student.text} if saved_with_text(name, entry) else {})}
    params, recipe = load_params(teachers / name, like)
    return params["backbone"], recipe

"""A trained workdir's student (restored from its latest checkpoint) and teachers, and the
student exported to diffusers.

Used by the sample, evaluate and export command lines. The export formats:

* ``export_diffusers``: the student's (merged) backbone as a diffusers
  ``SD3Transformer2DModel`` folder, plus ``source_embed.npy``, the edit conditioning diffusers
  has no place for (``examples/torch_edit_sd3.py`` runs edits with both).
* ``export_lora``: a LoRA student's factors as a diffusers LoRA file, to load on top of the
  teacher it started from (training.init: the anchor by default), plus ``source_embed.npy``,
  the source embedding it trained in full.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from danceopd_jax.config import init_teacher
from danceopd_jax.core.errors import ConfigError
from danceopd_jax.interop._common import flatten
from danceopd_jax.interop.diffusers_sd3 import SOURCE_EMBED_FILE, save_diffusers_transformer
from danceopd_jax.interop.peft_lora import save_diffusers_lora
from danceopd_jax.models.mmdit import MMDiTConfig, unstack_blocks
from danceopd_jax.train.checkpoint import CheckpointError, RunCheckpoints, load_params
from danceopd_jax.train.distill import (
    Provider,
    build,
    init_sources,
    initial_trainable,
    student_init,
)
from danceopd_jax.train.model import Models, student_params_fn
from danceopd_jax.train.state import TrainState, student_optimizer

Params = Any


@dataclass(frozen=True)
class Student:
    """A workdir's trained student and what running or exporting it needs."""

    config: ml_collections.ConfigDict
    world: Provider
    models: Models
    params: Params  # the student's backbone params (a LoRA student's merged onto its base)
    text: Params  # the frozen text encoder
    anchor: Params  # the frozen anchor teacher's backbone
    lora: Params | None  # the trained LoRA tree; None for full fine-tuning
    lora_alpha: float
    full: Params | None = None  # the base params a LoRA student trained in full

    @property
    def backbone_config(self) -> MMDiTConfig:
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
    like = TrainState.create(initial_trainable(config, init), optimizer, tc.seed)
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
    (``recipe["teacher"]["kind"]`` is "t2i" or "edit")."""
    teachers = Path(workdir).absolute() / "teachers"
    if not (teachers / name / "recipe.json").is_file():
        have = sorted(p.name for p in teachers.glob("*") if (p / "recipe.json").is_file())
        raise CheckpointError(f"{teachers} has no teacher {name!r}; it has {have}.")
    # The anchor was saved with the text encoder it trained (train/teachers.py).
    like = {"backbone": student.anchor, **({"text": student.text} if name == "anchor" else {})}
    params, recipe = load_params(teachers / name, like)
    return params["backbone"], recipe


def unscanned(config: MMDiTConfig, params: Params) -> tuple[MMDiTConfig, Params]:
    """(config, params) in the per-block layout diffusers uses (scanned layers unstacked);
    params may also be a LoRA tree, which mirrors them."""
    if not config.scan_layers:
        return config, params
    return dataclasses.replace(config, scan_layers=False), unstack_blocks(params, config)


def export_diffusers(student: Student, out: str | Path) -> Path:
    """Write the student as a diffusers ``SD3Transformer2DModel`` folder ``out`` and its source
    embedding (dropped from that folder: diffusers has no edit conditioning) to
    ``out/source_embed.npy``; return the latter's path."""
    out = Path(out)
    config, params = unscanned(student.backbone_config, student.params)
    save_diffusers_transformer(config, params, out, drop_source_embed=True)
    path = out / SOURCE_EMBED_FILE
    np.save(path, np.asarray(params["source_embed"], np.float32))
    return path


def export_lora(student: Student, out: str | Path) -> Path:
    """Write a LoRA student's factors as a diffusers LoRA under ``out`` (a folder or a
    ``.safetensors`` file) and the source embedding it trained in full as ``source_embed.npy``
    beside it; return the LoRA file written. Its base is the teacher it started from
    (lora_base_teacher)."""
    if student.lora is None:
        raise ValueError(
            "this workdir's student was trained with full fine-tuning (training.lora_rank=0), so "
            "it has no LoRA to export; use --format=diffusers to export the whole transformer."
        )
    lora_base_teacher(student)
    full = flatten(student.full or {})
    other = sorted("/".join(map(str, p)) for p in full if p != ("source_embed",))
    if other:
        raise ValueError(f"this LoRA student also trained {other} in full (training.lora_full), "
                         "which a diffusers LoRA file cannot carry; use --format=diffusers to "
                         "export the whole transformer.")
    _, tree = unscanned(student.backbone_config, student.lora)
    path = save_diffusers_lora(tree, student.lora_alpha, out)
    if ("source_embed",) in full:
        np.save(path.parent / SOURCE_EMBED_FILE, np.asarray(full[("source_embed",)], np.float32))
    return path


def lora_base_teacher(student: Student) -> str:
    """The teacher whose weights a LoRA student's factors sit on (training.init)."""
    name = init_teacher(student.config)
    if name is None:
        raise ConfigError("this LoRA student sits on the teachers' weight merge "
                         "(training.init=merge), which no checkpoint holds; use "
                         "--format=diffusers to export the whole (merged) transformer.")
    return name


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A path beside `out` to write the export to. When the block succeeds it replaces `out`
    by renames (the old export is deleted only once the new one is in place); when the block
    fails it is deleted and `out` is left as it was."""
    partial = out.with_name(f".partial-{os.getpid()}-{out.name}")  # same suffix: same format
    _remove(partial)
    try:
        yield partial
        if out.is_dir():  # a rename cannot replace a non-empty folder: move it aside first
            old = out.with_name(f".old-{os.getpid()}-{out.name}")
            os.replace(out, old)
            os.replace(partial, out)
            _remove(old)
        else:
            os.replace(partial, out)
    finally:
        _remove(partial)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

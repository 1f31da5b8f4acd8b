"""A trained workdir's student (restored from its latest checkpoint) and teachers, and the
student exported to diffusers.

Used by the sample, evaluate and export command lines. The export formats:

* ``export_diffusers``: the student's (merged) backbone as a diffusers
  ``SD3Transformer2DModel`` folder, plus ``source_embed.npy``, the edit conditioning diffusers
  has no place for (``examples/torch_edit_sd3.py`` runs edits with both).
* ``export_lora``: a LoRA student's factors as a diffusers LoRA file, to load on top of the
  workdir's anchor teacher (the base it was trained on).
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

from danceopd_jax.interop.diffusers_sd3 import SOURCE_EMBED_FILE, save_diffusers_transformer
from danceopd_jax.interop.peft_lora import save_diffusers_lora
from danceopd_jax.models.mmdit import MMDiTConfig, unstack_blocks
from danceopd_jax.train.checkpoint import CheckpointError, RunCheckpoints, load_params
from danceopd_jax.train.distill import Provider, build, initial_trainable
from danceopd_jax.train.model import Models, student_params_fn
from danceopd_jax.train.state import TrainState, student_optimizer

Params = Any


@dataclass(frozen=True)
class Student:
    """A workdir's trained student and what running or exporting it needs."""

    config: ml_collections.ConfigDict
    world: Provider
    models: Models
    params: Params  # the student's backbone params (a LoRA student's merged onto the anchor)
    text: Params  # the frozen text encoder
    anchor: Params  # the frozen anchor teacher's backbone: a LoRA student's base
    lora: Params | None  # the trained LoRA tree; None for full fine-tuning
    lora_alpha: float

    @property
    def backbone_config(self) -> MMDiTConfig:
        return nnx.merge(self.models.backbone, self.params).config


def load_student(workdir: str | Path) -> Student:
    """The student of a ``danceopd_jax.main`` workdir at its latest checkpoint (from
    ``config.json``, ``checkpoints/`` and the anchor teacher under ``teachers/anchor``)."""
    workdir = Path(workdir).absolute()
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{workdir} has no config.json; is it a danceopd_jax.main workdir?")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    world = build(config, workdir)
    anchor, text = world.load_anchor()
    tc = config.training
    frozen = {"teachers": {"anchor": anchor}, "text": text}
    optimizer = student_optimizer(tc)
    like = TrainState.create(initial_trainable(config, frozen), optimizer, tc.seed)
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    state, _ = checkpoints.restore(like)
    checkpoints.close()
    alpha = tc.lora_alpha or float(tc.lora_rank)
    params = student_params_fn("anchor", alpha)(state.trainable, frozen)
    return Student(config, world, world.models, params, text, anchor,
                   state.trainable.get("lora"), alpha)


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
    ``.safetensors`` file); return the file written."""
    if student.lora is None:
        raise ValueError(
            "this workdir's student was trained with full fine-tuning (training.lora_rank=0), so "
            "it has no LoRA to export; use --format=diffusers to export the whole transformer."
        )
    _, tree = unscanned(student.backbone_config, student.lora)
    return save_diffusers_lora(tree, student.lora_alpha, out)


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

"""The export command: a workdir's trained student (its latest checkpoint) for diffusers and
PyTorch. The formats:

* ``export_diffusers``: the student's (merged) backbone as its family's diffusers transformer
  folder, plus ``source_embed.npy`` where the family has one, the edit conditioning diffusers
  has no place for (``examples/torch_edit_sd3.py`` runs edits with both).
* ``export_lora``: a LoRA student's factors as a diffusers LoRA file in its family's names, to
  load on top of the teacher it started from (training.init: the anchor by default), plus
  ``source_embed.npy`` when it trained one in full.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from danceopd_jax.config import init_teacher
from danceopd_jax.core.errors import ConfigError
from danceopd_jax.interop._common import flatten
from danceopd_jax.interop.backbones import lora_names, transformer_io
from danceopd_jax.interop.diffusers_sd3 import SOURCE_EMBED_FILE
from danceopd_jax.interop.peft_lora import save_diffusers_lora
from danceopd_jax.jobs.workdir import Student, load_student
from danceopd_jax.models.backbones import backbone_of

Params = Any


def export(workdir: str | Path, out: str | Path, kind: str = "diffusers",
           overwrite: bool = False) -> str:
    """Write the student of `workdir` to `out` as `kind` ("diffusers" or "lora"); return what
    was written, for the user. An `out` that exists and is not empty is refused unless
    `overwrite`; the export is staged beside it and renamed into place."""
    out = Path(out)
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise ConfigError(f"--out={out} already exists and is not empty; pass --overwrite to "
                          "replace it, or choose another --out.")
    student = load_student(workdir)
    coarse = getattr(student.backbone_config, "coarse_scale", 0)
    if kind == "lora" and coarse:
        raise ConfigError(f"this student has coarse tokens (model.coarse_scale={coarse}), which "
                          "diffusers' transformers lack, so a LoRA on its base would compute "
                          "another function in a diffusers pipeline; use --format=diffusers, "
                          "whose folder examples/torch_edit_sd3.py runs as trained.")
    if kind == "lora":
        base = lora_base_teacher(student)  # before writing: a merge has no base to name
        with staged(out) as partial:
            written = export_lora(student, partial)
        path = out / written.relative_to(partial) if written != partial else out
        return (f"wrote the student's LoRA (alpha {student.lora_alpha:g}) to {path}; its base "
                f"is the {base} teacher under {workdir}/teachers/{base}."
                + (f" Its source embedding (edit conditioning) is in {path.parent}/"
                   "source_embed.npy." if student.full and "source_embed" in student.full else ""))
    with staged(out) as partial:
        written = export_diffusers(student, partial)
    class_name = transformer_io(backbone_of(student.backbone_config).name).CLASS_NAME
    message = f"wrote the student as a diffusers {class_name} to {out}."
    if coarse:
        message += (f"\nnote: it has coarse tokens (coarse_scale={coarse} in its config.json), "
                    f"which diffusers' {class_name} ignores with a warning, computing another "
                    "function; examples/torch_edit_sd3.py runs it as trained.")
    if written is None:
        return message
    return (f"{message}\nnote: diffusers' transformer has no edit conditioning, so that folder "
            "is the text-to-image model; the student's source embedding (its edit "
            f"conditioning) is in {out / written.relative_to(partial)}. "
            "examples/torch_edit_sd3.py runs edits with both.")


def export_diffusers(student: Student, out: str | Path) -> Path | None:
    """Write the student as its family's diffusers transformer folder ``out`` (for MMDiT an
    ``SD3Transformer2DModel``) and its source embedding, the edit conditioning that diffusers'
    transformer has no place for, to ``out/source_embed.npy``; return the latter's path (None
    for a family with native source images, which has none)."""
    out = Path(out)
    backbone = backbone_of(student.backbone_config)
    config, params = backbone.unscanned(student.backbone_config, student.params)
    params = dict(params)
    source_embed = params.pop("source_embed", None)
    transformer_io(backbone.name).save_diffusers_transformer(config, params, out)
    if source_embed is None:
        return None
    path = out / SOURCE_EMBED_FILE
    np.save(path, np.asarray(source_embed, np.float32))
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
    backbone = backbone_of(student.backbone_config)
    config, tree = backbone.unscanned(student.backbone_config, student.lora)
    path = save_diffusers_lora(tree, student.lora_alpha, out,
                               names=lora_names(backbone.name, config))
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

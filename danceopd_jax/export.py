"""python -m danceopd_jax.export --workdir=DIR --out=DIR [--format=diffusers|lora]

Exports the trained student of a workdir (its latest checkpoint) for diffusers:

* ``diffusers`` (default): an ``SD3Transformer2DModel`` folder that ``from_pretrained`` loads
  (a LoRA student is merged onto its anchor), plus ``source_embed.npy``, the student's edit
  conditioning, which diffusers' transformer has no place for.
* ``lora`` (LoRA students only): ``pytorch_lora_weights.safetensors`` for
  ``StableDiffusion3Pipeline.load_lora_weights``, on top of the teacher the student started
  from (the workdir's anchor by default), plus ``source_embed.npy``, trained in full.

An --out that exists and is not empty is refused unless --overwrite; the export is written
beside it and renamed into place, so --out never holds a half-written or mixed export.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from danceopd_jax import cli
from danceopd_jax.core.errors import ConfigError
from danceopd_jax.interop.workdir import (
    export_diffusers,
    export_lora,
    load_student,
    lora_base_teacher,
    staged,
)

_WORKDIR = cli.workdir_flag()
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_FORMAT = flags.DEFINE_enum("format", "diffusers", ["diffusers", "lora"],
                            "diffusers: the whole transformer; lora: a LoRA student's factors.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")


def main() -> None:
    out = Path(_OUT.value)
    if out.exists() and not _OVERWRITE.value and (out.is_file() or any(out.iterdir())):
        raise ConfigError(f"--out={out} already exists and is not empty; pass --overwrite to "
                          "replace it, or choose another --out.")
    student = load_student(_WORKDIR.value)
    if _FORMAT.value == "lora":
        base = lora_base_teacher(student)  # before writing: a merge has no base to name
        with staged(out) as partial:
            written = export_lora(student, partial)
        path = out / written.relative_to(partial) if written != partial else out
        print(f"wrote the student's LoRA (alpha {student.lora_alpha:g}) to {path}; its base is "
              f"the {base} teacher under {_WORKDIR.value}/teachers/{base}."
              + (f" Its source embedding (edit conditioning) is in {path.parent}/"
                 "source_embed.npy." if student.full and "source_embed" in student.full else ""))
        return
    with staged(out) as partial:
        source = out / export_diffusers(student, partial).relative_to(partial)
    print(f"wrote the student as a diffusers SD3Transformer2DModel to {_OUT.value}.\n"
          "note: diffusers' transformer has no edit conditioning, so that folder is the "
          "text-to-image model; the student's source embedding (its edit conditioning) is in "
          f"{source}. examples/torch_edit_sd3.py runs edits with both.")


if __name__ == "__main__":
    cli.run(main)

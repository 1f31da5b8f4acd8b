"""python -m danceopd_jax.export --workdir=DIR --out=DIR [--format=diffusers|lora]

Exports the trained student of a workdir (its latest checkpoint) for diffusers:

* ``diffusers`` (default): an ``SD3Transformer2DModel`` folder that ``from_pretrained`` loads
  (a LoRA student is merged onto its anchor), plus ``source_embed.npy``, the student's edit
  conditioning, which diffusers' transformer has no place for.
* ``lora`` (LoRA students only): ``pytorch_lora_weights.safetensors`` for
  ``StableDiffusion3Pipeline.load_lora_weights``, on top of the teacher the student started
  from (the workdir's anchor by default), plus ``source_embed.npy``, trained in full.
"""

from __future__ import annotations

from absl import app, flags

from danceopd_jax.interop.workdir import (
    export_diffusers,
    export_lora,
    load_student,
    lora_base_teacher,
)

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by danceopd_jax.main.",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_FORMAT = flags.DEFINE_enum("format", "diffusers", ["diffusers", "lora"],
                            "diffusers: the whole transformer; lora: a LoRA student's factors.")


def main(argv: list[str]) -> None:
    del argv
    student = load_student(_WORKDIR.value)
    if _FORMAT.value == "lora":
        path = export_lora(student, _OUT.value)
        base = lora_base_teacher(student)
        print(f"wrote the student's LoRA (alpha {student.lora_alpha:g}) to {path}; its base is "
              f"the {base} teacher under {_WORKDIR.value}/teachers/{base}."
              + (f" Its source embedding (edit conditioning) is in {path.parent}/"
                 "source_embed.npy." if student.full and "source_embed" in student.full else ""))
        return
    source = export_diffusers(student, _OUT.value)
    print(f"wrote the student as a diffusers SD3Transformer2DModel to {_OUT.value}.\n"
          "note: diffusers' transformer has no edit conditioning, so that folder is the "
          "text-to-image model; the student's source embedding (its edit conditioning) is in "
          f"{source}. examples/torch_edit_sd3.py runs edits with both.")


if __name__ == "__main__":
    app.run(main)

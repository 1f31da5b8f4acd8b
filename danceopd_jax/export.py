"""python -m danceopd_jax.export --workdir=DIR --out=DIR [--format=diffusers|lora]

Exports the trained student of a workdir (its latest checkpoint) for diffusers:

* ``diffusers`` (default): the backbone family's transformer folder that ``from_pretrained``
  loads (``SD3Transformer2DModel`` or ``ZImageTransformer2DModel``; a LoRA student is merged
  onto its anchor); for SD3 plus ``source_embed.npy``, the student's edit conditioning, which
  diffusers' SD3 transformer has no place for (Z-Image edits natively).
* ``lora`` (LoRA students only): ``pytorch_lora_weights.safetensors`` for the family's
  pipeline's ``load_lora_weights``, on top of the teacher the student started from (the
  workdir's anchor by default), plus, for SD3, ``source_embed.npy``, trained in full.

An --out that exists and is not empty is refused unless --overwrite; the export is written
beside it and renamed into place, so --out never holds a half-written or mixed export.
"""

from __future__ import annotations

from absl import flags

from danceopd_jax import cli
from danceopd_jax.jobs.export import export

_WORKDIR = cli.workdir_flag()
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_FORMAT = flags.DEFINE_enum("format", "diffusers", ["diffusers", "lora"],
                            "diffusers: the whole transformer; lora: a LoRA student's factors.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")


def main() -> None:
    print(export(_WORKDIR.value, _OUT.value, _FORMAT.value, _OVERWRITE.value))


if __name__ == "__main__":
    cli.run(main)

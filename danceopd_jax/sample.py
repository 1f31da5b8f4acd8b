"""python -m danceopd_jax.sample --workdir=DIR --prompt="..." [--source=img.png] [--out=x.png]

Generates with the trained student of a workdir (its latest checkpoint). With --source the
prompt is an edit instruction applied to that image (an RGB image of the world's size; --resize
converts another size or a grayscale / palette image); without, it is a T2I prompt. The prompt
must use the world's words; an empty one needs --unconditional.

On a real-model workdir (prepared data) the prompt is encoded by our Flax SD3 text encoders and
the samples decoded by our Flax VAE decoder, both converted from the folders the data was
prepared with (conditions.json: ``text_encoders``, ``vae``): no PyTorch. Only --source needs it,
to encode the source image with diffusers' VAE as the prepare command does.
"""

from __future__ import annotations

from absl import flags

from danceopd_jax import cli
from danceopd_jax.jobs.sample import sample

_WORKDIR = cli.workdir_flag()
_PROMPT = flags.DEFINE_string("prompt", None, "T2I prompt or edit instruction.", required=True)
_SOURCE = flags.DEFINE_string("source", None, "Source image (PNG) to edit.")
_OUT = flags.DEFINE_string("out", "sample.png", "Where to write the generated image.")
_STEPS = cli.sample_steps_flag()
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_NUM = flags.DEFINE_integer("num_images", 4, "How many samples (written side by side).")
_RESIZE = flags.DEFINE_bool("resize", False, "Convert a --source of another size (nearest "
                            "neighbour) or a grayscale / palette one to the world's RGB.")
_UNCONDITIONAL = flags.DEFINE_bool("unconditional", False,
                                   "Allow an empty --prompt: unconditional samples.")


def main() -> None:
    print(sample(_WORKDIR.value, _PROMPT.value, _OUT.value, _SOURCE.value, _STEPS.value,
                 _SEED.value, _NUM.value, _RESIZE.value, _UNCONDITIONAL.value))


if __name__ == "__main__":
    cli.run(main)

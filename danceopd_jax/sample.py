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

from pathlib import Path

import jax
import numpy as np
from absl import flags
from PIL import Image

from danceopd_jax import cli
from danceopd_jax.config import world_kind
from danceopd_jax.core.errors import ConfigError, DataError
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.data.batches import to_unit_range
from danceopd_jax.data.conditions import load_image
from danceopd_jax.data.shapes.tokenizer import encode, unknown_words
from danceopd_jax.eval.shapes import make_generator, read_source
from danceopd_jax.interop.workdir import Student, load_student
from danceopd_jax.train.prepared import latent_generator

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
    if _NUM.value < 1:
        raise ConfigError(f"--num_images={_NUM.value}: ask for at least 1 sample.")
    if not _PROMPT.value.strip() and not _UNCONDITIONAL.value:
        raise ConfigError("--prompt is empty, which samples unconditionally; pass "
                          "--unconditional if that is what you want, or a prompt.")
    student = load_student(_WORKDIR.value)
    config, world = student.config, student.world
    if world_kind(config) != "shapes":
        _sample_prepared(student)
        return
    size = config.world.image_size
    unknown = unknown_words(world.tokenizer, _PROMPT.value)
    if unknown:
        raise ConfigError(f"--prompt={_PROMPT.value!r}: the words {unknown} are not in the "
                          "shapes world's vocabulary (the student would read them as [UNK]); "
                          "use its shapes, colours, positions and edit verbs, as in "
                          f"{_WORKDIR.value}/samples.")
    ids, mask = encode(world.tokenizer, [_PROMPT.value] * _NUM.value)
    batch = {"input_ids": ids, "attention_mask": mask,
             "target": np.zeros((_NUM.value, size, size, 3), np.float32)}
    if _SOURCE.value:
        src = read_source(_SOURCE.value, size, _RESIZE.value)
        batch["source"] = np.broadcast_to(to_unit_range(src), (_NUM.value, size, size, 3))
        batch["has_source"] = np.ones((_NUM.value,), bool)
    sigmas = make_sigmas(_STEPS.value or config.eval.sample_steps, config.danceopd.shift,
                         config.danceopd.schedule)
    generate = make_generator(student.models.field(), student.models.conditioner(), sigmas)
    images = np.asarray(generate(student.params, student.text, batch, jax.random.key(_SEED.value)))
    Image.fromarray(np.concatenate(list(images), axis=1)).resize(
        (size * 4 * _NUM.value, size * 4), Image.NEAREST).save(_OUT.value)
    print(f"wrote {_NUM.value} sample(s) for {_PROMPT.value!r} to {_OUT.value}")


def _sample_prepared(student: Student) -> None:
    # Imported here: transformers' tokenizers are needed for real models only.
    from danceopd_jax.interop.transformers_text import SD3PromptEncoder

    world, num = student.world, _NUM.value
    manifest = world.data.manifest
    missing = [k for k in ("text_encoders", "vae", "max_sequence_length") if k not in manifest]
    if missing:
        raise DataError(f"{world.data.directory}/conditions.json lacks {missing}: sampling "
                             "needs the encoders the data was prepared with; prepare it with "
                             "`python -m danceopd_jax.prepare`.")
    decode = world.image_decoder()
    if decode is None:
        raise DataError(f"the VAE folder {manifest['vae']} (conditions.json's \"vae\") is "
                             "not here; sampling decodes with it. Restore it at that path.")
    text, pooled = SD3PromptEncoder(manifest["text_encoders"], manifest["max_sequence_length"],
                                    batch_size=num)([_PROMPT.value] * num)
    shape = (num, *world.data.latent_shape)
    batch = {"text": text, "pooled": pooled, "target": np.zeros(shape, np.float32)}
    if _SOURCE.value:
        from danceopd_jax.interop.diffusers_vae import VAEEncoder  # PyTorch, as in prepare

        image = load_image(Path(_SOURCE.value), tuple(manifest["resolution"]))
        batch["source"] = np.broadcast_to(VAEEncoder(manifest["vae"])(image[None]), shape)
        batch["has_source"] = np.ones((num,), bool)
    generate = latent_generator(student.config, student.models)
    latents = generate(student.params, student.text, batch, jax.random.key(_SEED.value))
    images = decode(np.asarray(latents))
    Image.fromarray(np.concatenate(list(images), axis=1)).save(_OUT.value)
    print(f"wrote {num} sample(s) for {_PROMPT.value!r} to {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)

"""The sample command: generate with the trained student of a workdir (its latest
checkpoint). With a source image the prompt is an edit instruction applied to that image (an
RGB image of the world's size; --resize converts another size or a grayscale / palette image);
without, it is a T2I prompt. The prompt must use the world's words; an empty one needs
--unconditional.

On a real-model workdir (prepared data) the prompt (and a source image's features beside its
latents) is encoded as the prepare command does, by our Flax encoders of the backbone family's
pipeline, and the samples decoded by our Flax VAE decoder, both converted from the folders the
data was prepared with (conditions.json: ``text_encoders``, ``vae``): no PyTorch. Only --source
needs it, to encode the source image with diffusers' VAE as the prepare command does.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from PIL import Image

from danceopd_jax.config import world_kind
from danceopd_jax.core.errors import ConfigError, DataError
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.data.batches import to_unit_range
from danceopd_jax.data.conditions import load_image
from danceopd_jax.data.shapes.tokenizer import encode, unknown_words
from danceopd_jax.eval.shapes import make_generator, read_source
from danceopd_jax.jobs.workdir import Student, load_student
from danceopd_jax.worlds.prepared import latent_generator


def sample(workdir: str | Path, prompt: str, out: str | Path = "sample.png",
           source: str | None = None, sample_steps: int | None = None, seed: int = 0,
           num_images: int = 4, resize: bool = False, unconditional: bool = False) -> str:
    """Write `num_images` samples of the student of `workdir` for `prompt` (an edit of
    `source` when given) side by side to `out`; return what was written, for the user."""
    if num_images < 1:
        raise ConfigError(f"--num_images={num_images}: ask for at least 1 sample.")
    if not prompt.strip() and not unconditional:
        raise ConfigError("--prompt is empty, which samples unconditionally; pass "
                          "--unconditional if that is what you want, or a prompt.")
    student = load_student(workdir)
    config, world = student.config, student.world
    if world_kind(config) != "shapes":
        return _sample_prepared(student, prompt, out, source, seed, num_images)
    size = config.world.image_size
    unknown = unknown_words(world.tokenizer, prompt)
    if unknown:
        raise ConfigError(f"--prompt={prompt!r}: the words {unknown} are not in the "
                          "shapes world's vocabulary (the student would read them as [UNK]); "
                          "use its shapes, colours, positions and edit verbs, as in "
                          f"{workdir}/samples.")
    ids, mask = encode(world.tokenizer, [prompt] * num_images)
    batch = {"input_ids": ids, "attention_mask": mask,
             "target": np.zeros((num_images, size, size, 3), np.float32)}
    if source:
        src = read_source(source, size, resize)
        batch["source"] = np.broadcast_to(to_unit_range(src), (num_images, size, size, 3))
        batch["has_source"] = np.ones((num_images,), bool)
    sigmas = make_sigmas(sample_steps or config.eval.sample_steps, config.danceopd.shift,
                         config.danceopd.schedule)
    generate = make_generator(student.models.field(), student.models.conditioner(), sigmas)
    images = np.asarray(generate(student.params, student.text, batch, jax.random.key(seed)))
    Image.fromarray(np.concatenate(list(images), axis=1)).resize(
        (size * 4 * num_images, size * 4), Image.NEAREST).save(out)
    return f"wrote {num_images} sample(s) for {prompt!r} to {out}"


def _sample_prepared(student: Student, prompt: str, out: str | Path, source: str | None,
                     seed: int, num: int) -> str:
    # Imported here: transformers' tokenizers are needed for real models only.
    from danceopd_jax.data.conditions import as_condition_encoder
    from danceopd_jax.interop.backbones import condition_encoder

    world = student.world
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
    conditions = as_condition_encoder(condition_encoder(
        world.backbone.name, manifest["text_encoders"], manifest["max_sequence_length"],
        batch_size=num))
    shape = (num, *world.data.latent_shape)
    batch = {**conditions.text([prompt] * num, with_source=bool(source)),
             "target": np.zeros(shape, np.float32)}
    if source:
        from danceopd_jax.interop.diffusers_vae import VAEEncoder  # PyTorch, as in prepare

        image = load_image(Path(source), tuple(manifest["resolution"]))[None]
        features = {"source": VAEEncoder(manifest["vae"])(image), **conditions.source(image)}
        batch |= {k: np.broadcast_to(v, (num, *v.shape[1:])) for k, v in features.items()}
        batch["has_source"] = np.ones((num,), bool)
    generate = latent_generator(student.config, student.models)
    latents = generate(student.params, student.text, batch, jax.random.key(seed))
    images = decode(np.asarray(latents))
    Image.fromarray(np.concatenate(list(images), axis=1)).save(out)
    return f"wrote {num} sample(s) for {prompt!r} to {out}"

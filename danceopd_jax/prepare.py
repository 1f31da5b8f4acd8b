"""python -m danceopd_jax.prepare --input=rows.jsonl|rows.csv --out=DIR --text_encoders=PIPELINE
    --vae=VAE_DIR [--resolution=1024] [--config=configs/x.py]

Turns a prompt / edit table (columns prompt, task, source_image, target_image; image paths
relative to the table) into precomputed SD3 conditions and VAE latents, one array_record
dataset per task bucket (layout: danceopd_jax/data/conditions.py). Point a real-model config's
``world.conditions`` at DIR. With --config, every bucket its routes read must be in the table.
"""

from __future__ import annotations

import tensorflow_datasets as tfds
from absl import flags

from danceopd_jax import cli
from danceopd_jax.config import routes_of
from danceopd_jax.jobs.prepare import STORE_DTYPES, prepare

_INPUT = flags.DEFINE_string("input", None, "The table: a .csv (header row) or .jsonl file.",
                             required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (must not hold prepared data yet).",
                           required=True)
_TEXT = flags.DEFINE_string(
    "text_encoders", None, "A diffusers StableDiffusion3Pipeline folder holding text_encoder, "
    "text_encoder_2, text_encoder_3 and tokenizer, tokenizer_2, tokenizer_3.", required=True)
_VAE = flags.DEFINE_string("vae", None, "A diffusers AutoencoderKL folder (<pipeline>/vae).",
                           required=True)
_RESOLUTION = flags.DEFINE_string("resolution", "1024", "Image size: N or HEIGHTxWIDTH.")
_MAX_LEN = flags.DEFINE_integer("max_sequence_length", 256, "T5 tokens (diffusers' default).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows encoded at once.")
_DTYPE = flags.DEFINE_enum("dtype", "float16", list(STORE_DTYPES), "Storage dtype of arrays.")
_CONFIG = cli.config_flag(
    "config", None, "Optional experiment config: check that its routes' buckets are here.")


def main() -> None:
    tfds.disable_progress_bar()
    config = _CONFIG.value
    routes = routes_of(config) if config is not None else None
    kinds = {n: t.kind for n, t in config.teachers.items()} if config is not None else None
    manifest = prepare(_INPUT.value, _OUT.value, _TEXT.value, _VAE.value, _RESOLUTION.value,
                       _MAX_LEN.value, _BATCH.value, _DTYPE.value, routes, kinds)
    print(f"wrote prepared conditions to {manifest.parent} (manifest {manifest.name})")


if __name__ == "__main__":
    cli.run(main)

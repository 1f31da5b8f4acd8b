"""python -m danceopd_jax.prepare --input=rows.jsonl|rows.csv --out=DIR --text_encoders=PIPELINE
    --vae=VAE_DIR [--backbone=mmdit|zimage] [--resolution=1024] [--config=configs/x.py]

Turns a prompt / edit table (columns prompt, task, source_image, target_image; image paths
relative to the table) into the precomputed conditions of a backbone family (mmdit: SD3 / SD3.5
text and pooled features; zimage: Z-Image's Qwen3 prompt pieces, and SigLIP features of source
images for its omni edits) and VAE latents, one array_record dataset per task bucket (layout:
danceopd_jax/data/conditions.py). Point a real-model config's ``world.conditions`` at DIR. With
--config, every bucket its routes read must be in the table.
"""

from __future__ import annotations

import tensorflow_datasets as tfds
from absl import flags

from danceopd_jax import cli
from danceopd_jax.config import routes_of
from danceopd_jax.jobs.prepare import DEFAULT_FAMILY, FAMILIES, STORE_DTYPES, prepare

_INPUT = flags.DEFINE_string("input", None, "The table: a .csv (header row) or .jsonl file.",
                             required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (must not hold prepared data yet).",
                           required=True)
_TEXT = flags.DEFINE_string(
    "text_encoders", None, "The backbone's diffusers pipeline folder: for mmdit a "
    "StableDiffusion3Pipeline's (text_encoder, text_encoder_2, text_encoder_3 and tokenizer, "
    "tokenizer_2, tokenizer_3); for zimage a ZImagePipeline's (text_encoder, tokenizer) or a "
    "ZImageOmniPipeline's (also siglip, siglip_processor: SigLIP features of source images).",
    required=True)
_BACKBONE = flags.DEFINE_enum("backbone", DEFAULT_FAMILY, list(FAMILIES),
                              "The backbone family whose conditions to prepare.")
_VAE = flags.DEFINE_string("vae", None, "A diffusers AutoencoderKL folder (<pipeline>/vae).",
                           required=True)
_RESOLUTION = flags.DEFINE_string("resolution", "1024", "Image size: N or HEIGHTxWIDTH.")
_MAX_LEN = flags.DEFINE_integer(
    "max_sequence_length", None, "Text tokens per prompt (default: the pipeline's, SD3's 256 T5 "
    "tokens or Z-Image's 512 Qwen3 tokens).")
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
                       _MAX_LEN.value, _BATCH.value, _DTYPE.value, routes, kinds,
                       _BACKBONE.value)
    print(f"wrote prepared conditions to {manifest.parent} (manifest {manifest.name})")


if __name__ == "__main__":
    cli.run(main)

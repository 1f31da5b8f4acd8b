"""The prepare command: a prompt / edit table -> precomputed SD3 conditions and VAE latents
(the layout of data/conditions.py), what a prepared world (worlds/prepared.py) trains on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from danceopd_jax.core.errors import DataError
from danceopd_jax.core.routing import Route
from danceopd_jax.data.conditions import (
    STORE_DTYPES,
    bucket_summary,
    check_routes,
    parse_resolution,
    read_rows,
    write_prepared,
)
from danceopd_jax.interop.diffusers_vae import VAEEncoder
from danceopd_jax.interop.transformers_text import SD3PromptEncoder

__all__ = ["STORE_DTYPES", "prepare"]  # the storage dtypes: the command line's choices


def prepare(rows_file: str | Path, out: str | Path, text_encoders: str | Path, vae: str | Path,
            resolution: str | int = 1024, max_sequence_length: int = 256, batch_size: int = 16,
            dtype: str = "float16", routes: Sequence[Route] | None = None,
            teacher_kinds: dict[str, str] | None = None) -> Path:
    """The prepare command: check the table (and, given `routes`, that every route's bucket is
    in it), then encode prompts with our Flax SD3 text encoders (from a diffusers SD3 pipeline
    folder) and images with diffusers' AutoencoderKL in PyTorch, and write `out`."""
    size = parse_resolution(resolution)
    rows = read_rows(rows_file)
    if routes is not None:
        check_routes(routes, teacher_kinds or {}, bucket_summary(rows), str(rows_file))
    encode_text = SD3PromptEncoder(text_encoders, max_sequence_length, batch_size)
    encode_images = VAEEncoder(vae)
    if size[0] % encode_images.downsample or size[1] % encode_images.downsample:
        raise DataError(f"resolution {size[0]}x{size[1]} is not a multiple of the VAE's "
                        f"downsampling factor {encode_images.downsample}; pick one that is.")
    provenance = {"rows_file": str(Path(rows_file).absolute()),
                  "text_encoders": str(Path(text_encoders).absolute()),
                  "vae": str(Path(vae).absolute()),
                  "max_sequence_length": max_sequence_length,
                  "vae_scaling_factor": encode_images.scaling_factor,
                  "vae_shift_factor": encode_images.shift_factor}
    return write_prepared(out, rows, encode_text, encode_images, size, batch_size, dtype,
                          provenance)

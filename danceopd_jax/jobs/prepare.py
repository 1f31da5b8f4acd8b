"""The prepare command: a prompt / edit table -> precomputed conditions of a backbone family and
VAE latents (the layout of data/conditions.py), what a prepared world (worlds/prepared.py)
trains on. Which conditions a family reads is its interop side's (interop/backbones.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from danceopd_jax.core.errors import ConfigError, DataError
from danceopd_jax.core.routing import Route
from danceopd_jax.data.conditions import (
    STORE_DTYPES,
    bucket_summary,
    check_routes,
    parse_resolution,
    read_rows,
    write_prepared,
)
from danceopd_jax.interop._common import read_config
from danceopd_jax.interop.backbones import (
    checkpoint_family,
    condition_encoder,
    default_sequence_length,
)
from danceopd_jax.interop.diffusers_vae import VAEEncoder
from danceopd_jax.models.backbones import BACKBONES, DEFAULT_FAMILY

# The command line's choices: storage dtypes and backbone families (and the default).
FAMILIES = tuple(sorted(BACKBONES))
__all__ = ["DEFAULT_FAMILY", "FAMILIES", "STORE_DTYPES", "prepare"]


def prepare(rows_file: str | Path, out: str | Path, text_encoders: str | Path, vae: str | Path,
            resolution: str | int = 1024, max_sequence_length: int | None = None,
            batch_size: int = 16, dtype: str = "float16", routes: Sequence[Route] | None = None,
            teacher_kinds: dict[str, str] | None = None, backbone: str = DEFAULT_FAMILY) -> Path:
    """The prepare command: check the table (and, given `routes`, that every route's bucket is
    in it), then encode prompts (and source images) with our Flax encoders of `backbone`'s
    pipeline (the diffusers pipeline folder `text_encoders`; `max_sequence_length` None: the
    pipeline's default) and images with diffusers' AutoencoderKL in PyTorch, and write
    `out`."""
    if backbone not in BACKBONES:
        raise ConfigError(f"--backbone={backbone!r}: use one of {list(FAMILIES)}.")
    size = parse_resolution(resolution)
    rows = read_rows(rows_file)
    if routes is not None:
        check_routes(routes, teacher_kinds or {}, bucket_summary(rows), str(rows_file))
    _check_pipeline(Path(text_encoders), backbone)
    length = max_sequence_length or default_sequence_length(backbone)
    try:
        encode_conditions = condition_encoder(backbone, text_encoders, length, batch_size)
        encode_images = VAEEncoder(vae)
    except (FileNotFoundError, KeyError, ValueError) as e:
        if getattr(e, "exit_code", None) is not None:
            raise
        raise DataError(f"{e} (prepare --backbone={backbone} --text_encoders={text_encoders} "
                        f"--vae={vae})") from e
    if size[0] % encode_images.downsample or size[1] % encode_images.downsample:
        raise DataError(f"resolution {size[0]}x{size[1]} is not a multiple of the VAE's "
                        f"downsampling factor {encode_images.downsample}; pick one that is.")
    provenance = {"backbone": backbone,
                  "rows_file": str(Path(rows_file).absolute()),
                  "text_encoders": str(Path(text_encoders).absolute()),
                  "vae": str(Path(vae).absolute()),
                  "max_sequence_length": length,
                  "vae_scaling_factor": encode_images.scaling_factor,
                  "vae_shift_factor": encode_images.shift_factor}
    return write_prepared(out, rows, encode_conditions, encode_images, size, batch_size, dtype,
                          provenance)


def _check_pipeline(pipeline: Path, backbone: str) -> None:
    """A pipeline folder whose transformer belongs to another family is the wrong --backbone
    (a folder without a transformer, e.g. only the encoders, is not checked)."""
    config = pipeline / "transformer" / "config.json"
    if not config.is_file():
        return
    try:
        family = checkpoint_family(read_config(config.parent), config.parent)
    except ValueError:
        return  # a transformer we do not convert: the encoders may still be usable
    if family != backbone:
        raise ConfigError(f"--text_encoders={pipeline} is a pipeline of backbone family "
                          f"{family!r} (its transformer/config.json), but --backbone={backbone}; "
                          f"pass --backbone={family} or that family's pipeline folder.")

"""python -m danceopd_jax.memory [--image_size=1024] [--hardware=8xH100,v5p-64]

Prints, as a markdown table, the bytes per device of a DanceOPD run for SD3.5-Medium, a 6B
member of the MMDiT family and Z-Image's 6B transformer with 2 teachers, LoRA and full
fine-tuning, from the code's own parameter shapes and sharding rules (train/memory.py; nothing
is downloaded or allocated).
docs/scaling.md holds its output.
"""

from __future__ import annotations

import dataclasses

from absl import app, flags

from danceopd_jax import cli
from danceopd_jax.models.mmdit import mmdit_6b_config, sd35_medium_config
from danceopd_jax.models.zimage import zimage_6b_config
from danceopd_jax.train.memory import (
    HARDWARE,
    ZIMAGE_OTHER_TOKENS,
    Workload,
    markdown,
    memory_table,
)

_SIZE = flags.DEFINE_integer("image_size", 1024, "Image side in pixels.")
_HARDWARE = flags.DEFINE_list("hardware", list(HARDWARE), f"Any of {list(HARDWARE)}.")
_RANK = flags.DEFINE_integer("lora_rank", 64, "LoRA rank of the LoRA rows.")
# name -> (config, tokens besides the image's)
MODELS = {"SD3.5-Medium": (sd35_medium_config, 333), "MMDiT-6B": (mmdit_6b_config, 333),
          "Z-Image-6B": (zimage_6b_config, ZIMAGE_OTHER_TOKENS)}


def main() -> None:
    unknown = sorted(set(_HARDWARE.value) - set(HARDWARE))
    if unknown:
        raise app.UsageError(f"--hardware {unknown} unknown; use {list(HARDWARE)}.")
    workload = Workload(image_size=_SIZE.value, lora_rank=_RANK.value)
    rows = [(name, HARDWARE[hw].name, mode,
             memory_table(make(), HARDWARE[hw],
                          dataclasses.replace(workload, text_tokens=other), mode))
            for name, (make, other) in MODELS.items() for hw in _HARDWARE.value
            for mode in ("lora", "full")]
    print(f"{workload.image_size}^2, edit source in the sequence, besides the image tokens 333 "
          f"text tokens (SD3) or {ZIMAGE_OTHER_TOKENS} caption and SigLIP tokens (Z-Image), "
          f"K={workload.query_k}, {workload.teachers} teachers, float32 parameters; "
          "GiB per device")
    print(markdown(rows))


if __name__ == "__main__":
    cli.run(main)

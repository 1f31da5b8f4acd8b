"""python -m danceopd_jax.memory [--image_size=1024] [--hardware=8xH100,v5p-64]

Prints, as a markdown table, the bytes per device of a DanceOPD run for SD3.5-Medium, a 6B
member of the MMDiT family and Z-Image's 6B transformer with 2 teachers, LoRA and full
fine-tuning, from the code's own parameter shapes and sharding rules (jobs/memory.py; nothing
is downloaded or allocated).
docs/scaling.md holds its output.
"""

from __future__ import annotations

from absl import app, flags

from danceopd_jax import cli
from danceopd_jax.jobs.memory import HARDWARE, report

_SIZE = flags.DEFINE_integer("image_size", 1024, "Image side in pixels.")
_HARDWARE = flags.DEFINE_list("hardware", list(HARDWARE), f"Any of {list(HARDWARE)}.")
_RANK = flags.DEFINE_integer("lora_rank", 64, "LoRA rank of the LoRA rows.")


def main() -> None:
    unknown = sorted(set(_HARDWARE.value) - set(HARDWARE))
    if unknown:
        raise app.UsageError(f"--hardware {unknown} unknown; use {list(HARDWARE)}.")
    print(report(_SIZE.value, _HARDWARE.value, _RANK.value))


if __name__ == "__main__":
    cli.run(main)

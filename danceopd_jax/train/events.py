"""TensorBoard event files of a run, written with tensorboardX (no TensorFlow), so that
`tensorboard --logdir runs/` shows every run under runs/ as with any JAX trainer: the logged
training metrics (loss, gradient norm, rate, steps/s, the method's own), the held-out score
curve, the final scores, and the sample grids as images. Process 0 writes them, under
<workdir>/tensorboard/; metrics.jsonl, curve.jsonl, scores.json and samples/ stay the record.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter


class Events:
    def __init__(self, logdir: Path):
        self.writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def grids(self, directory: Path, step: int) -> None:
        """Every sample grid written for `step` (samples/<name>_step<step>.png) as an image."""
        for path in sorted(directory.glob(f"*_step{step:06d}.png")):
            image = np.asarray(Image.open(path).convert("RGB"))
            name = path.name.removesuffix(f"_step{step:06d}.png")
            self.writer.add_image(f"samples/{name}", image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()

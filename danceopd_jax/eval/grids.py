"""Sample grids (PNG) that show what a model does: T2I prompts, and edits as
source | exact target | generated, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SCALE = 4  # nearest-neighbour upscaling, so 24 px images are readable
PAD = 4


def _tile(image: np.ndarray, scale: int) -> Image.Image:
    return Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale),
                                         Image.NEAREST)


def save_grid(path: str | Path, rows: list[list[np.ndarray]], captions: list[str],
              header: str = "", scale: int = SCALE) -> Path:
    """Each row: images placed left to right, with its caption to the right; `header`: lines
    of text above the rows; images upscaled `scale` times (nearest neighbour)."""
    tall, wide = rows[0][0].shape[0] * scale, rows[0][0].shape[1] * scale
    cols = max(len(r) for r in rows)
    lines = header.splitlines()
    text_w = 7 * max([len(c) for c in captions]) + 2 * PAD
    width = max(cols * (wide + PAD) + PAD + text_w, 7 * max([0, *map(len, lines)]) + 2 * PAD)
    top = 14 * len(lines)
    canvas = Image.new("RGB", (width, top + len(rows) * (tall + PAD) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((PAD, 1 + 14 * i), line, fill="black")
    for i, (images, caption) in enumerate(zip(rows, captions, strict=True)):
        y = top + PAD + i * (tall + PAD)
        for j, image in enumerate(images):
            canvas.paste(_tile(image, scale), (PAD + j * (wide + PAD), y))
        draw.text((cols * (wide + PAD) + PAD, y + tall // 2 - 5), caption, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

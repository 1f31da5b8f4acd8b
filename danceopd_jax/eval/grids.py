"""Sample grids (PNG) that show what a model does: T2I prompts, and edits as
source | exact target | generated, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SCALE = 4  # nearest-neighbour upscaling, so 24 px images are readable
PAD = 4


def _tile(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image).resize((image.shape[1] * SCALE, image.shape[0] * SCALE),
                                         Image.NEAREST)


def save_grid(path: str | Path, rows: list[list[np.ndarray]], captions: list[str],
              header: str = "") -> Path:
    """Each row: images placed left to right, with its caption to the right; `header`: lines
    of text above the rows."""
    side = rows[0][0].shape[0] * SCALE
    cols = max(len(r) for r in rows)
    lines = header.splitlines()
    text_w = 7 * max([len(c) for c in captions]) + 2 * PAD
    width = max(cols * (side + PAD) + PAD + text_w, 7 * max([0, *map(len, lines)]) + 2 * PAD)
    top = 14 * len(lines)
    canvas = Image.new("RGB", (width, top + len(rows) * (side + PAD) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((PAD, 1 + 14 * i), line, fill="black")
    for i, (images, caption) in enumerate(zip(rows, captions, strict=True)):
        y = top + PAD + i * (side + PAD)
        for j, image in enumerate(images):
            canvas.paste(_tile(image), (PAD + j * (side + PAD), y))
        draw.text((cols * (side + PAD) + PAD, y + side // 2 - 5), caption, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

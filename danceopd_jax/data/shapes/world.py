"""Scenes of the procedural shapes world and their exact, hard-edged rendering.

A scene is a background colour plus 1-4 coloured shapes on a 3x3 grid (one per
cell) and an optional whole-image style. Rendering is pure numpy, deterministic
and uses exact palette colours (no anti-aliasing) so a parser can recover the
scene exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 50),
    "blue": (30, 60, 230),
    "yellow": (245, 220, 30),
    "orange": (245, 130, 20),
    "purple": (140, 50, 190),
    "cyan": (30, 210, 230),
    "pink": (245, 120, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "brown": (130, 75, 30),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
STYLES: tuple[str, ...] = ("plain", "invert", "grayscale", "outline")

GRID = 3
NUM_CELLS = GRID * GRID
MAX_OBJECTS = 4
MIN_SIZE = 12
# ITU-R BT.601 luma weights for the grayscale style.
LUMA = np.array([0.299, 0.587, 0.114])

# Predicate over (shape, colour) object combinations; used to keep held-out
# combinations out of the training data.
PairFilter = Callable[[str, str], bool]


@dataclass(frozen=True)
class Obj:
    """One shape of one palette colour in one grid cell (0..8, row-major, 0 = top left)."""

    shape: str
    color: str
    cell: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; use one of {SHAPES}")
        if self.color not in PALETTE:
            raise ValueError(f"unknown colour {self.color!r}; use one of {COLORS}")
        if not isinstance(self.cell, int | np.integer) or not 0 <= self.cell < NUM_CELLS:
            raise ValueError(
                f"cell {self.cell!r} is not a grid cell; use an int in 0..{NUM_CELLS - 1}"
            )
        # numpy ints would leak into JSON specs and keys; store a plain int.
        object.__setattr__(self, "cell", int(self.cell))

    @property
    def pair(self) -> tuple[str, str]:
        return (self.shape, self.color)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "cell": self.cell}


@dataclass(frozen=True)
class Scene:
    """A background colour, 1-4 objects in distinct cells, and a whole-image style.

    Objects are stored sorted by cell, so equal scenes compare equal regardless
    of the order they were listed in.
    """

    background: str
    objects: tuple[Obj, ...]
    style: str = "plain"

    def __post_init__(self) -> None:
        if self.background not in PALETTE:
            raise ValueError(f"unknown background colour {self.background!r}; use one of {COLORS}")
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; use one of {STYLES}")
        objects = tuple(self.objects)
        if not 1 <= len(objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(objects)}")
        cells = [o.cell for o in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(
                f"objects share a grid cell (cells {sorted(cells)}); use one object per cell"
            )
        for o in objects:
            if o.color == self.background:
                raise ValueError(
                    f"object {o} has the background colour {self.background!r}; pick another colour"
                )
        # Canonical order makes equality and keys independent of listing order.
        object.__setattr__(self, "objects", tuple(sorted(objects, key=lambda o: o.cell)))

    def key(self) -> str:
        """A canonical string identifying the scene (used to keep splits disjoint)."""
        objs = ",".join(f"{o.cell}:{o.color}:{o.shape}" for o in self.objects)
        return f"{self.background}|{objs}|{self.style}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "background": self.background,
            "objects": [o.to_dict() for o in self.objects],
            "style": self.style,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(d["background"], tuple(Obj(**o) for o in d["objects"]), d.get("style", "plain"))


def cell_size(size: int) -> int:
    """Side of one grid cell in pixels; validates the image size."""
    if not isinstance(size, int) or size < MIN_SIZE or size % GRID:
        raise ValueError(
            f"image size {size!r} is invalid; use an int >= {MIN_SIZE} divisible by {GRID}, e.g. 24"
        )
    return size // GRID


def shape_side(size: int) -> int:
    """Side of a shape's bounding box: ~75% of the cell (6 px at size 24)."""
    return max(3, round(0.75 * cell_size(size)))


@functools.cache
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [s, s] mask of `shape` as drawn in an image of `size` (cached, read-only).

    Pixel centres are mapped to [-1, 1]^2 and tested against the ideal shape,
    which yields hard edges. At size 24 (s = 6) the row widths are
    circle 4-6-6-6-6-4, square 6x6, triangle 2-2-4-4-6-6, diamond 2-4-6-6-4-2,
    cross 2-2-6-6-2-2: all distinct.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    s = shape_side(size)
    centres = (np.arange(s) + 0.5) / s * 2.0 - 1.0
    v, u = np.meshgrid(centres, centres, indexing="ij")
    eps = 1e-9  # boundary pixels land exactly on the edge; keep them despite rounding
    if shape == "circle":
        mask = u**2 + v**2 <= 1.0 + eps
    elif shape == "square":
        mask = np.ones((s, s), bool)
    elif shape == "triangle":
        # Apex up; width measured at each row's lower edge so the top row is non-empty.
        mask = np.abs(u) <= (v + 1.0 / s + 1.0) / 2.0 + eps
    elif shape == "diamond":
        mask = np.abs(u) + np.abs(v) <= 1.0 + eps
    else:  # cross
        mask = (np.abs(u) <= 1.0 / 3.0 + eps) | (np.abs(v) <= 1.0 / 3.0 + eps)
    mask.setflags(write=False)
    return mask


def cell_origin(cell: int, size: int) -> tuple[int, int]:
    """Top-left (row, col) pixel of the shape box centred in `cell`."""
    c = cell_size(size)
    offset = (c - shape_side(size)) // 2
    r, k = divmod(cell, GRID)
    return r * c + offset, k * c + offset


def label_map(scene: Scene, size: int) -> np.ndarray:
    """int8 [size, size]: index of the object covering each pixel, -1 for background."""
    s = shape_side(size)
    labels = np.full((size, size), -1, np.int8)
    for k, o in enumerate(scene.objects):
        y, x = cell_origin(o.cell, size)
        labels[y : y + s, x : x + s][shape_mask(o.shape, size)] = k
    return labels


def render(scene: Scene, size: int = 24) -> np.ndarray:
    """Render `scene` as uint8 [size, size, 3]; `size` must be >= 12 and divisible by 3."""
    labels = label_map(scene, size)
    colors = np.array(
        [PALETTE[scene.background]] + [PALETTE[o.color] for o in scene.objects], np.uint8
    )
    image = colors[labels.astype(np.int64) + 1]
    if scene.style == "invert":
        image = 255 - image
    elif scene.style == "grayscale":
        gray = np.rint(image @ LUMA).astype(np.uint8)
        image = np.repeat(gray[..., None], 3, axis=-1)
    elif scene.style == "outline":
        image[interior_mask(labels)] = PALETTE[scene.background]
    return image


def interior_mask(labels: np.ndarray) -> np.ndarray:
    """Object pixels whose four neighbours all belong to the same object."""
    # Padding with -1 makes pixels on the image border count as boundary.
    padded = np.pad(labels, 1, constant_values=-1)
    centre = padded[1:-1, 1:-1]
    same = (
        (padded[:-2, 1:-1] == centre)
        & (padded[2:, 1:-1] == centre)
        & (padded[1:-1, :-2] == centre)
        & (padded[1:-1, 2:] == centre)
    )
    return (labels >= 0) & same


def candidate_pairs(
    allowed: PairFilter | None,
    exclude_colors: frozenset[str] | set[str] = frozenset(),
    exclude_pairs: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset(),
) -> list[tuple[str, str]]:
    """All (shape, colour) combinations passing `allowed` and the exclusions."""
    return [
        (shape, color)
        for shape in SHAPES
        for color in COLORS
        if color not in exclude_colors
        and (shape, color) not in exclude_pairs
        and (allowed is None or allowed(shape, color))
    ]


def pick(rng: np.random.Generator, options: list[Any] | tuple[Any, ...], what: str) -> Any:
    """Uniformly pick one option; raise a clear error when a filter left none."""
    if not options:
        raise ValueError(f"no valid {what} left to sample; the `allowed` filter is too restrictive")
    return options[int(rng.integers(len(options)))]

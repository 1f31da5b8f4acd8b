"""Image-editing triples (source scene, instruction, exact target scene).

Sources are plain scenes with 1-3 objects whose (colour, shape) pairs are
unique, so "the red circle" always names exactly one object. Targets differ
from sources exactly as instructed and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from danceopd_jax.data.shapes.prompts import object_phrase, with_article
from danceopd_jax.data.shapes.world import (
    COLORS,
    NUM_CELLS,
    PALETTE,
    SHAPES,
    Obj,
    PairFilter,
    Scene,
    candidate_pairs,
    pick,
)

LOCAL_EDITS: tuple[str, ...] = ("add", "remove", "replace", "recolor")
GLOBAL_EDITS: tuple[str, ...] = ("background", "style")
EDIT_KINDS: tuple[str, ...] = LOCAL_EDITS + GLOBAL_EDITS
STYLE_INSTRUCTIONS: dict[str, str] = {
    "invert": "invert the colors",
    "grayscale": "make it grayscale",
    "outline": "draw only the outlines",
}
MAX_SOURCE_OBJECTS = 3


def add_instruction(obj: Obj) -> str:
    return f"add {object_phrase(obj.color, obj.shape, obj.cell)}"


def remove_instruction(obj: Obj) -> str:
    return f"remove the {obj.color} {obj.shape}"


def replace_instruction(obj: Obj, shape: str) -> str:
    return f"turn the {obj.color} {obj.shape} into {with_article(shape)}"


def recolor_instruction(obj: Obj, color: str) -> str:
    return f"make the {obj.color} {obj.shape} {color}"


def background_instruction(color: str) -> str:
    return f"change the background to {color}"


def _is_neutral(color: str) -> bool:
    r, g, b = PALETTE[color]
    return r == g == b


def sample_source(
    rng: np.random.Generator, num_objects: int, allowed: PairFilter | None = None
) -> Scene:
    """A plain scene with `num_objects` objects of unique (shape, colour) pairs."""
    bg = pick(rng, COLORS, "background colour")
    pairs: list[tuple[str, str]] = []
    for _ in range(num_objects):
        pairs.append(pick(rng, candidate_pairs(allowed, {bg}, set(pairs)), "source object"))
    cells = rng.choice(NUM_CELLS, size=num_objects, replace=False)
    return Scene(
        bg, tuple(Obj(shape, color, int(c)) for (shape, color), c in zip(pairs, cells, strict=True))
    )


def _without(scene: Scene, obj: Obj) -> tuple[Obj, ...]:
    return tuple(o for o in scene.objects if o != obj)


def sample_edit(
    rng: np.random.Generator,
    kind: str,
    allowed: PairFilter | None = None,
    styles: tuple[str, ...] = tuple(STYLE_INSTRUCTIONS),
) -> tuple[Scene, str, Scene, dict[str, Any]]:
    """Sample (source, instruction, target, spec) for one edit kind.

    `allowed(shape, colour)` restricts every object combination in both source
    and target; `styles` the styles a style edit draws from. spec holds "kind",
    "cell" (the edited cell for local edits, else None), "style" (for style
    edits, else None) and both scenes as dicts.
    """
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; use one of {EDIT_KINDS}")
    if not styles or set(styles) - set(STYLE_INSTRUCTIONS):
        raise ValueError(
            f"styles={styles!r}; use a non-empty subset of {tuple(STYLE_INSTRUCTIONS)}"
        )
    # remove needs a survivor; add needs room for a fourth object at most.
    low = 2 if kind == "remove" else 1
    source = sample_source(rng, int(rng.integers(low, MAX_SOURCE_OBJECTS + 1)), allowed)
    bg, objects = source.background, source.objects
    pairs = {o.pair for o in objects}
    cell: int | None = None
    style: str | None = None
    if kind == "add":
        shape, color = pick(rng, candidate_pairs(allowed, {bg}, pairs), "object to add")
        free = [c for c in range(NUM_CELLS) if c not in {o.cell for o in objects}]
        new = Obj(shape, color, pick(rng, free, "free cell"))
        cell, instruction = new.cell, add_instruction(new)
        target = Scene(bg, (*objects, new))
    elif kind == "remove":
        old = pick(rng, objects, "object to remove")
        cell, instruction = old.cell, remove_instruction(old)
        target = Scene(bg, _without(source, old))
    elif kind == "replace":
        options = [
            (o, s)
            for o in objects
            for s in SHAPES
            if s != o.shape
            and (s, o.color) not in pairs
            and (allowed is None or allowed(s, o.color))
        ]
        old, shape = pick(rng, options, "shape replacement")
        cell, instruction = old.cell, replace_instruction(old, shape)
        target = Scene(bg, (*_without(source, old), Obj(shape, old.color, old.cell)))
    elif kind == "recolor":
        options = [
            (o, c)
            for o in objects
            for c in COLORS
            if c not in (o.color, bg)
            and (o.shape, c) not in pairs
            and (allowed is None or allowed(o.shape, c))
        ]
        old, color = pick(rng, options, "recolouring")
        cell, instruction = old.cell, recolor_instruction(old, color)
        target = Scene(bg, (*_without(source, old), Obj(old.shape, color, old.cell)))
    elif kind == "background":
        used = {bg} | {o.color for o in objects}
        color = pick(rng, [c for c in COLORS if c not in used], "background colour")
        instruction = background_instruction(color)
        target = Scene(color, objects)
    else:
        # Grayscale leaves all-neutral scenes unchanged; never emit no-op edits.
        has_hue = any(not _is_neutral(c) for c in (bg, *(o.color for o in objects)))
        style = pick(rng, [s for s in styles if s != "grayscale" or has_hue], "style")
        instruction = STYLE_INSTRUCTIONS[style]
        target = Scene(bg, objects, style)
    spec = {
        "kind": kind,
        "cell": cell,
        "style": style,
        "source": source.to_dict(),
        "target": target.to_dict(),
    }
    return source, instruction, target, spec


def vocabulary_texts() -> Iterator[str]:
    """Texts covering every word any edit instruction can contain."""
    for color in COLORS:
        for shape in SHAPES:
            obj = Obj(shape, color, 0)
            yield remove_instruction(obj)
            yield recolor_instruction(obj, color)
            yield replace_instruction(obj, shape)
            for cell in range(NUM_CELLS):
                yield add_instruction(Obj(shape, color, cell))
        yield background_instruction(color)
    yield from STYLE_INSTRUCTIONS.values()

"""Text-to-image prompts (GenEval-like categories) generated from shapes-world scenes.

Every prompt fully specifies what it asks for; `sample_t2i` also returns a
machine-readable spec of exactly those requirements for scoring.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from danceopd_jax.data.shapes.world import (
    COLORS,
    GRID,
    MAX_OBJECTS,
    NUM_CELLS,
    SHAPES,
    Obj,
    PairFilter,
    Scene,
    candidate_pairs,
    pick,
)

CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_objects",
    "counting",
    "colors",
    "position",
    "color_attr",
)
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
RELATIONS: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}


def position_phrase(cell: int) -> str:
    """'at the top left', ..., 'in the center'."""
    return "in the center" if POSITIONS[cell] == "center" else f"at the {POSITIONS[cell]}"


def with_article(phrase: str) -> str:
    """'a red circle', 'an orange circle'."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def object_phrase(color: str, shape: str, cell: int | None = None) -> str:
    base = with_article(f"{color} {shape}")
    return base if cell is None else f"{base} {position_phrase(cell)}"


def background_phrase(color: str) -> str:
    return f"on a {color} background"


def relation_holds(relation: str, cell_a: int, cell_b: int) -> bool:
    """Whether object in `cell_a` is `relation` the one in `cell_b`, in grid rows/columns."""
    (ra, ca), (rb, cb) = divmod(cell_a, GRID), divmod(cell_b, GRID)
    if relation == "left_of":
        return ca < cb
    if relation == "right_of":
        return ca > cb
    if relation == "above":
        return ra < rb
    if relation == "below":
        return ra > rb
    raise ValueError(f"unknown relation {relation!r}; use one of {tuple(RELATIONS)}")


def counting_phrase(count: int, color: str, shape: str) -> str:
    return f"{NUMBER_WORDS[count]} {color} {PLURALS[shape]}"


def _spec(
    category: str, scene: Scene, objects: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "category": category,
        "background": scene.background,
        "objects": objects,
        "relation": None,
        "count": None,
        "scene": scene.to_dict(),
    }
    spec.update(extra)
    return spec


def _cells(rng: np.random.Generator, n: int) -> list[int]:
    return [int(c) for c in rng.choice(NUM_CELLS, size=n, replace=False)]


def sample_t2i(
    rng: np.random.Generator, category: str, allowed: PairFilter | None = None
) -> tuple[Scene, str, dict[str, Any]]:
    """Sample (scene, prompt, spec) for one category.

    `allowed(shape, colour)` restricts which object combinations may appear;
    spec lists each requested object as {"shape", "color", "cell"} with
    cell None where the prompt leaves the position free.
    """
    bg = pick(rng, COLORS, "background colour")
    no_bg = frozenset({bg})
    if category in ("single_object", "colors"):
        shape, color = pick(rng, candidate_pairs(allowed, no_bg), "object")
        obj = Obj(shape, color, _cells(rng, 1)[0])
        scene = Scene(bg, (obj,))
        cell = obj.cell if category == "single_object" else None
        prompt = f"{object_phrase(color, shape, cell)} {background_phrase(bg)}"
        return (
            scene,
            prompt,
            _spec(category, scene, [{"shape": shape, "color": color, "cell": cell}]),
        )
    if category == "counting":
        count = int(rng.integers(2, MAX_OBJECTS + 1))
        shape, color = pick(rng, candidate_pairs(allowed, no_bg), "object")
        scene = Scene(bg, tuple(Obj(shape, color, c) for c in _cells(rng, count)))
        prompt = f"{counting_phrase(count, color, shape)} {background_phrase(bg)}"
        objects = [{"shape": shape, "color": color, "cell": None}]
        return scene, prompt, _spec(category, scene, objects, count=count)
    if category in ("two_objects", "position", "color_attr"):
        first = pick(rng, candidate_pairs(allowed, no_bg), "object")
        if category == "color_attr":
            # Binding colour to shape is only testable when both differ.
            second = pick(
                rng,
                [p for p in candidate_pairs(allowed, no_bg | {first[1]}) if p[0] != first[0]],
                "second object",
            )
        else:
            second = pick(rng, candidate_pairs(allowed, no_bg, {first}), "second object")
        relation = None
        if category == "position":
            relation = pick(rng, tuple(RELATIONS), "relation")
            options = [
                (a, b)
                for a in range(NUM_CELLS)
                for b in range(NUM_CELLS)
                if relation_holds(relation, a, b)
            ]
            cell_a, cell_b = pick(rng, options, "cell pair")
        else:
            cell_a, cell_b = _cells(rng, 2)
        a, b = Obj(*first, cell_a), Obj(*second, cell_b)
        scene = Scene(bg, (a, b))
        if category == "two_objects":
            phrases = [object_phrase(o.color, o.shape, o.cell) for o in (a, b)]
            prompt = " and ".join(phrases)
            objects = [a.to_dict(), b.to_dict()]
        else:
            link = "and" if relation is None else RELATIONS[relation]
            prompt = f"{object_phrase(a.color, a.shape)} {link} {object_phrase(b.color, b.shape)}"
            objects = [{"shape": o.shape, "color": o.color, "cell": None} for o in (a, b)]
        return (
            scene,
            f"{prompt} {background_phrase(bg)}",
            _spec(category, scene, objects, relation=relation),
        )
    raise ValueError(f"unknown T2I category {category!r}; use one of {CATEGORIES}")


def vocabulary_texts() -> Iterator[str]:
    """Texts covering every word any prompt can contain, including the longest prompt shape.

    Each prompt is a fixed template whose slots take colour, shape, position,
    count and relation words; rendering every slot value once covers the vocabulary.
    """
    for color in COLORS:
        for shape in SHAPES:
            for cell in range(NUM_CELLS):
                yield f"{object_phrase(color, shape, cell)} {background_phrase(color)}"
            for count in NUMBER_WORDS:
                yield f"{counting_phrase(count, color, shape)} {background_phrase(color)}"
    for relation in RELATIONS.values():
        a, b = object_phrase("red", "circle"), object_phrase("blue", "square")
        yield f"{a} {relation} {b} {background_phrase('white')}"
    for cell_a in range(NUM_CELLS):
        for cell_b in range(NUM_CELLS):
            a, b = object_phrase("red", "circle", cell_a), object_phrase("blue", "square", cell_b)
            yield f"{a} and {b} {background_phrase('white')}"

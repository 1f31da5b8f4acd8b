"""Programmatic parser and scorers for generated shapes-world images.

Images may be uint8 in [0, 255] or floating point in [-1, 1] (the model's
output range; values are clipped, then mapped with (x + 1) * 127.5). Parsing
snaps every pixel to its nearest palette colour, takes the most frequent
colour as background, splits the other colours into 4-connected components,
drops components smaller than a quarter of the smallest shape, assigns each
component to the grid cell holding its centroid (keeping the largest one per
cell) and classifies its shape as the reference mask with the best IoU after
centring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from danceopd_jax.data.shapes.prompts import relation_holds
from danceopd_jax.data.shapes.world import (
    COLORS,
    GRID,
    PALETTE,
    SHAPES,
    Obj,
    Scene,
    cell_size,
    render,
    shape_mask,
)

MIN_AREA_FRACTION = 0.25  # of the smallest shape's area; smaller blobs are noise
PIXEL_TOLERANCE = 40  # max per-channel |difference| for a pixel to match a styled target
MATCH_FRACTION = 0.9  # fraction of pixels that must match for a styled target
_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], np.int32)


@dataclass(frozen=True)
class ParsedScene:
    """What `parse` recovered: like a plain `Scene` but with any number (0-9) of objects."""

    background: str
    objects: tuple[Obj, ...]
    style: str = "plain"

    def at(self, cell: int) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def find(self, color: str, shape: str, cell: int | None = None) -> list[Obj]:
        """Objects with this colour and shape (and cell, unless None)."""
        return [
            o for o in self.objects if o.pair == (shape, color) and (cell is None or o.cell == cell)
        ]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Accept uint8 [H, W, 3] or float [H, W, 3] in [-1, 1]; return uint8."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image shape {image.shape} is invalid; pass [H, W, 3]")
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        return np.rint((np.clip(image, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    raise ValueError(
        f"image dtype {image.dtype} is unsupported; pass uint8 in [0, 255] or float in [-1, 1]"
    )


def _nearest_palette(image: np.ndarray) -> np.ndarray:
    """int [H, W]: index into COLORS of each pixel's nearest palette colour."""
    diff = image.astype(np.int32)[:, :, None, :] - _PALETTE_RGB
    return np.argmin((diff * diff).sum(-1), axis=-1)


def _components(colors: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Label 4-connected same-colour foreground regions; background pixels get -1.

    Each label is the smallest flat pixel index in its region, found by
    propagating minima between equal-coloured neighbours until stable.
    """
    h, w = colors.shape
    big = h * w
    labels = np.where(foreground, np.arange(big).reshape(h, w), big)
    link_v = foreground[:-1] & foreground[1:] & (colors[:-1] == colors[1:])
    link_h = foreground[:, :-1] & foreground[:, 1:] & (colors[:, :-1] == colors[:, 1:])
    while True:
        new = labels.copy()
        new[:-1] = np.where(link_v, np.minimum(new[:-1], labels[1:]), new[:-1])
        new[1:] = np.where(link_v, np.minimum(new[1:], labels[:-1]), new[1:])
        new[:, :-1] = np.where(link_h, np.minimum(new[:, :-1], labels[:, 1:]), new[:, :-1])
        new[:, 1:] = np.where(link_h, np.minimum(new[:, 1:], labels[:, :-1]), new[:, 1:])
        if np.array_equal(new, labels):
            return np.where(foreground, labels, -1)
        labels = new


def _classify(mask: np.ndarray, size: int) -> str:
    """Shape whose reference mask best overlaps (IoU) the component, centred, +-1 px slack."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        template = shape_mask(shape, size)
        s = template.shape[0]
        m = max(s, h, w) + 2  # room for the +-1 shifts
        ref = np.zeros((m, m), bool)
        ref[(m - s) // 2 : (m - s) // 2 + s, (m - s) // 2 : (m - s) // 2 + s] = template
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                y, x = (m - h) // 2 + dy, (m - w) // 2 + dx
                if y < 0 or x < 0 or y + h > m or x + w > m:
                    continue
                placed = np.zeros((m, m), bool)
                placed[y : y + h, x : x + w] = crop
                iou = (placed & ref).sum() / (placed | ref).sum()
                if iou > best_iou:
                    best, best_iou = shape, iou
    return best


def parse(image: np.ndarray, size: int | None = None) -> ParsedScene:
    """Recover the plain scene drawn in `image` (see module docstring for the method)."""
    image = to_uint8(image)
    if image.shape[0] != image.shape[1] or (size is not None and image.shape[0] != size):
        raise ValueError(
            f"image shape {image.shape} does not match size {size}; pass a square [size, size, 3]"
        )
    size = image.shape[0]
    cell = cell_size(size)
    colors = _nearest_palette(image)
    bg = int(np.bincount(colors.ravel(), minlength=len(COLORS)).argmax())
    labels = _components(colors, colors != bg)
    min_area = MIN_AREA_FRACTION * min(int(shape_mask(s, size).sum()) for s in SHAPES)
    ids, areas = np.unique(labels[labels >= 0], return_counts=True)
    best: dict[int, tuple[int, Obj]] = {}
    for label, area in zip(ids, areas, strict=True):
        if area < min_area:
            continue
        mask = labels == label
        ys, xs = np.nonzero(mask)
        row = min(int(ys.mean() // cell), GRID - 1)
        col = min(int(xs.mean() // cell), GRID - 1)
        obj = Obj(_classify(mask, size), COLORS[colors.flat[label]], row * GRID + col)
        if obj.cell not in best or area > best[obj.cell][0]:
            best[obj.cell] = (int(area), obj)
    objects = tuple(best[c][1] for c in sorted(best))
    return ParsedScene(COLORS[bg], objects)


def score_t2i(image: np.ndarray, spec: dict[str, Any]) -> dict[str, bool]:
    """Per-requirement correctness of a generated image for a T2I spec, plus "all".

    Every category checks "background" and "count" (no objects beyond those
    asked for). single_object/colors also check "color", "shape" (and
    "position" for single_object) of the best-matching object; two_objects,
    color_attr and position check "object_<i>" is present (at its cell when
    the prompt names one), position also "relation"; counting checks "count"
    as the number of matching objects.
    """
    parsed = parse(image)
    category = spec["category"]
    wanted = spec["objects"]
    result = {"background": parsed.background == spec["background"]}
    if category in ("single_object", "colors"):
        want = wanted[0]
        # Judge the object the model most plausibly meant: exact match, else same cell, else any.
        ranked = sorted(
            parsed.objects,
            key=lambda o: (
                (o.color, o.shape) != (want["color"], want["shape"]),
                o.cell != want["cell"],
                o.color != want["color"],
            ),
        )
        obj = ranked[0] if ranked else None
        result["color"] = obj is not None and obj.color == want["color"]
        result["shape"] = obj is not None and obj.shape == want["shape"]
        if category == "single_object":
            result["position"] = obj is not None and obj.cell == want["cell"]
        result["count"] = len(parsed.objects) == 1
    elif category == "counting":
        want = wanted[0]
        result["count"] = len(parsed.find(want["color"], want["shape"])) == spec["count"]
        result["no_extra"] = len(parsed.objects) == spec["count"]
    elif category in ("two_objects", "color_attr", "position"):
        found = [parsed.find(w["color"], w["shape"], w["cell"]) for w in wanted]
        for i, matches in enumerate(found):
            result[f"object_{i}"] = bool(matches)
        if category == "position":
            result["relation"] = any(
                relation_holds(spec["relation"], a.cell, b.cell) for a in found[0] for b in found[1]
            )
        result["count"] = len(parsed.objects) == len(wanted)
    else:
        raise ValueError(f"unknown T2I category {category!r} in spec")
    result["all"] = all(result.values())
    return result


def _max_channel_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1)


def score_edit(image: np.ndarray, spec: dict[str, Any]) -> dict[str, bool]:
    """Score an edited image: "changed" (instructed change happened), "preserved", "correct".

    Plain targets are compared as parsed scenes: local edits check the edited
    cell ("changed") and every other cell plus the background ("preserved");
    background edits check the background and the objects. Styled targets are
    compared pixelwise with the exact rendered target (PIXEL_TOLERANCE):
    "changed" needs MATCH_FRACTION of the pixels where target and source differ
    to match the target (vacuously true if none differ at this size), so
    returning the source fails; "preserved" needs the same for the other pixels.
    """
    kind = spec["kind"]
    source, target = Scene.from_dict(spec["source"]), Scene.from_dict(spec["target"])
    if target.style != "plain":
        image = to_uint8(image)
        size = image.shape[0]
        want, before = render(target, size), render(source, size)
        matches = _max_channel_diff(image, want) <= PIXEL_TOLERANCE
        differs = _max_channel_diff(want, before) > PIXEL_TOLERANCE
        changed = not differs.any() or matches[differs].mean() >= MATCH_FRACTION
        preserved = differs.all() or matches[~differs].mean() >= MATCH_FRACTION
    else:
        parsed = parse(image)
        if kind == "background":
            changed = parsed.background == target.background
            preserved = parsed.objects == target.objects
        else:
            cell = spec["cell"]
            want_obj = next((o for o in target.objects if o.cell == cell), None)
            changed = parsed.at(cell) == want_obj
            preserved = parsed.background == target.background and [
                o for o in parsed.objects if o.cell != cell
            ] == [o for o in target.objects if o.cell != cell]
    return {
        "changed": bool(changed),
        "preserved": bool(preserved),
        "correct": bool(changed and preserved),
    }

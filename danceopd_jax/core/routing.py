"""Hard routing: every sample belongs to exactly ONE route = (teacher field, data bucket).

Two modes (METHOD.md 3):
- "per_sample" (the paper): each batch holds a static slot of n_m consecutive samples per
  route, n_m fixed from the route weights, so each teacher runs only on its own samples and
  shapes stay static under jit.
- "per_step" (the reference's parity mode): one weighted draw per optimizer step; the whole
  batch follows that route.
Every process derives the draw from (seed, step), never from its own state, so all agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ROUTING_MODES = ("per_sample", "per_step")
_ROUTE_STREAM = 0x52_4F_55_54  # "ROUT": keeps route draws independent of other numpy streams


@dataclass(frozen=True)
class Route:
    name: str
    teacher: str
    bucket: str
    weight: float
    cfg_alpha: float = 1.0


@dataclass(frozen=True)
class Slot:
    route: int
    start: int
    stop: int


def validate_routes(routes: Sequence[Route], teacher_kinds: Mapping[str, str],
                    bucket_has_source: Mapping[str, bool]) -> None:
    """Fail fast (before any data is built or anything compiled) on an unusable route table.

    teacher_kinds: teacher name -> "t2i" | "edit"; bucket_has_source: bucket -> whether its
    samples carry a source image.
    """
    if not routes:
        raise ValueError("no routes configured: add at least one entry under config.routes.")
    for r in routes:
        if r.teacher not in teacher_kinds:
            raise ValueError(
                f"route {r.name!r} sends samples to teacher {r.teacher!r}, which is not defined; "
                f"known teachers: {sorted(teacher_kinds)}. Fix config.routes.{r.name}.teacher."
            )
        if r.bucket not in bucket_has_source:
            raise ValueError(
                f"route {r.name!r} reads bucket {r.bucket!r}, which does not exist; known buckets: "
                f"{sorted(bucket_has_source)}. Fix config.routes.{r.name}.bucket."
            )
        if not np.isfinite(r.weight) or r.weight < 0:
            raise ValueError(
                f"route {r.name!r} has weight {r.weight}; route weights must be finite and >= 0."
            )
        if teacher_kinds[r.teacher] == "edit" and not bucket_has_source[r.bucket]:
            raise ValueError(
                f"route {r.name!r} sends bucket {r.bucket!r} to edit teacher {r.teacher!r}, but "
                "that bucket has no source images; route an edit bucket to it."
            )
        if r.cfg_alpha < 0:
            raise ValueError(f"route {r.name!r} has cfg_alpha {r.cfg_alpha}; it must be >= 0.")
    if sum(r.weight for r in routes) <= 0:
        raise ValueError(
            f"all route weights are zero ({[r.weight for r in routes]}); give at least one "
            "route a positive weight."
        )


def slot_sizes(weights: Sequence[float], batch: int) -> tuple[int, ...]:
    """Static per-route slot sizes summing to `batch` (largest remainder; every positive-weight
    route gets at least one sample)."""
    w = np.asarray(weights, np.float64)
    active = int((w > 0).sum())
    if batch < active:
        raise ValueError(
            f"batch size {batch} cannot hold one sample for each of the {active} routes with a "
            "positive weight; raise the batch size or use routing mode 'per_step'."
        )
    ideal = w / w.sum() * batch
    sizes = np.floor(ideal).astype(int)
    for i in np.argsort(-(ideal - sizes), kind="stable")[: batch - sizes.sum()]:
        sizes[i] += 1
    for i in np.flatnonzero((w > 0) & (sizes == 0)):  # a tiny weight still gets its sample
        sizes[np.argmax(sizes)] -= 1
        sizes[i] = 1
    return tuple(int(s) for s in sizes)


def per_sample_slots(weights: Sequence[float], batch: int) -> tuple[Slot, ...]:
    slots, start = [], 0
    for m, n in enumerate(slot_sizes(weights, batch)):
        if n:
            slots.append(Slot(m, start, start + n))
        start += n
    return tuple(slots)


def per_step_route(seed: int, step: int, weights: Sequence[float]) -> int:
    """The route of optimizer step `step`: a weighted draw every process computes alike."""
    w = np.asarray(weights, np.float64)
    rng = np.random.default_rng([seed, step, _ROUTE_STREAM])
    return int(rng.choice(len(w), p=w / w.sum()))


def step_slots(mode: str, seed: int, step: int, weights: Sequence[float],
               batch: int) -> tuple[Slot, ...]:
    """The slot layout of one step's batch in either routing mode."""
    if mode == "per_sample":
        return per_sample_slots(weights, batch)
    if mode == "per_step":
        return (Slot(per_step_route(seed, step, weights), 0, batch),)
    raise ValueError(f"routing mode {mode!r} is unknown; use one of {ROUTING_MODES}.")

"""A world: what a main job trains in. It provides the routes, the models (the backbone and
text encoder as fields, models/wiring.py), the teachers (made or reused, with their
provenance), the training rows and the scorer; the training loop, the step and the algorithm
are the same for every world.

* shapes (worlds/shapes.py, the default): the embedded shapes world, teachers trained by flow
  matching or shipped with the package, ShapesBench scores.
* prepared (worlds/prepared.py, config.world.kind = "prepared"): conditions prepared by
  `python -m danceopd_jax.prepare`, teachers converted from diffusers checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import ml_collections
from jax.sharding import Mesh

from danceopd_jax.config import (
    config_errors,
    validate,
    world_kind,
)
from danceopd_jax.core.routing import Route
from danceopd_jax.data.batches import TrainBucket
from danceopd_jax.models.wiring import Models
from danceopd_jax.worlds.shapes import ShapesWorld

Params = Any


class World(Protocol):
    """What the main job needs from a world."""

    routes: list[Route]
    models: Models
    bucket_has_source: dict[str, bool]  # whether a bucket's rows carry source images

    def prepare_teachers(self, mesh: Mesh) -> tuple[dict[str, Params], Params]:
        """({teacher name: backbone params}, the frozen "text" params), made or reused."""

    def load_anchor(self) -> tuple[Params, Params]:
        """The anchor's params and the frozen "text" params, from the workdir only."""

    def load_teachers(self, names: list[str]) -> tuple[dict[str, Params], Params]:
        """({name: params} of the anchor, `names` and what they need, the frozen "text"
        params), from the workdir only."""

    def train(self, bucket: str) -> TrainBucket:
        """A bucket's training rows."""

    def sampler(self, out_dir: Path) -> Callable[[Params, Params, int], None]:
        """(student params, text params, step) -> writes the student's samples."""

    def curve(self, path: Path, start: int) -> Callable[[Params, Params, int], dict | None]:
        """(student params, text params, step) -> appends quick held-out scores to `path` and
        returns that row (rows after step `start` are dropped first: a resumed run scores them
        again)."""

    def evaluate(self, teachers: dict[str, Params], student: Params, text: Params) -> dict:
        """Held-out scores of the teachers and the student (shapes: a ShapesBench report with
        the verdicts on the config's targets, "targets")."""


def build(config: ml_collections.ConfigDict, workdir: Path) -> World:
    """Validate the config and build the run's world (nothing loaded into it or compiled);
    a config it cannot be built from raises ConfigError."""
    validate(config)
    with config_errors():
        if world_kind(config) == "prepared":
            from danceopd_jax.worlds.prepared import PreparedWorld  # tfds, only when needed

            return PreparedWorld(config, workdir)
        return ShapesWorld(config, workdir)

"""The frozen teachers: made once by flow matching, then reused.

Each teacher has a recipe (config.teachers.<name>: data bucket, starting point, steps, ...).
A teacher trained from scratch (the anchor, on T2I data) trains the text encoder with it, which
is then frozen for everyone. Every other teacher is fine-tuned from another one: edit teachers
from the anchor on edit buckets, and the omni base (the omni family's anchor) from the T2I
anchor on a weighted mix of T2I and edit buckets (config.teacher's `mix`). The anchor is saved
with the text encoder either way.

Lookup order for a teacher, by its recipe (the key of data/store.py cached, which lists what
makes the weights and not the teacher's name): the workdir (reused), then the checkpoints
shipped with the package, in danceopd_jax/assets/<config.shipped_teachers>/<name>/ or any other
family's folder (only if their recipe.json has this recipe as its key: the omni family reuses
the shapes family's T2I anchor), else it is trained; either way it is saved in the workdir.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from danceopd_jax.config import init_teacher, teacher_buckets
from danceopd_jax.core.routing import Route
from danceopd_jax.data.batches import Bucket, RouteBatcher, has_sources
from danceopd_jax.data.store import cached, has_params, key_of, load_params
from danceopd_jax.models.wiring import Models
from danceopd_jax.train.checkpoint import RunCheckpoints
from danceopd_jax.train.loop import MetricsWriter, fit
from danceopd_jax.train.mesh import batch_shards, to_host
from danceopd_jax.train.state import make_optimizer, place_state
from danceopd_jax.train.step import make_flow_matching_step

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_DIR = ASSETS_DIR / "shapes_teachers"  # the anchor and joint-edit teacher
Params = Any


def shipped_dir(config: ml_collections.ConfigDict) -> Path:
    """Where the teachers of `config`'s family are shipped (config.shipped_teachers)."""
    return ASSETS_DIR / config.get("shipped_teachers", SHIPPED_DIR.name)


# What makes a teacher's weights besides its own recipe and seed: exactly these world and
# model fields (not, e.g., remat, which changes memory and speed only), and the optional model
# fields when they are set (so recipes made before them still match).
WORLD_FIELDS = ("image_size", "train_size", "seed")
MODEL_FIELDS = ("patch_size", "width", "depth", "heads", "text_width", "text_layers",
                "text_heads", "dtype")
OPTIONAL_MODEL_FIELDS = ("coarse_scale", "text_bidirectional")


def recipe(config: ml_collections.ConfigDict, name: str) -> dict:
    """Everything that determines teacher `name`'s weights (its init chain included): the key
    of its saved weights (data/store.py cached)."""
    t = config.teachers[name]
    return {"teacher": {k: v for k, v in t.to_dict().items() if k != "keep_t2i" or v},
            "world": {k: config.world[k] for k in WORLD_FIELDS},
            "model": {k: config.model[k] for k in MODEL_FIELDS}
            | {k: config.model[k] for k in OPTIONAL_MODEL_FIELDS if config.model.get(k)},
            "seed": config.seed,
            "init": None if t.init == "scratch" else recipe(config, t.init)}


def saved_with_text(name: str, teacher: ml_collections.ConfigDict | dict) -> bool:
    """Whether teacher `name` (its recipe entry) is saved with a text encoder: one trained
    from scratch trains it, and the anchor carries the one everybody uses."""
    return teacher.get("init") == "scratch" or name == "anchor"


def needed_teachers(config: ml_collections.ConfigDict, routes: list[Route]) -> list[str]:
    """The anchor, every routed teacher and the one the student starts from (training.init).
    What they are fine-tuned from is needed only to train them (prepare_teachers)."""
    return list(dict.fromkeys(["anchor", *(r.teacher for r in routes),
                               init_teacher(config) or "anchor"]))


def prepare_teachers(config: ml_collections.ConfigDict, routes: list[Route], models: Models,
                     init_backbone: Params, init_text: Params,
                     bucket: Callable[[str], Bucket], mesh: Mesh, workdir: Path,
                     shipped_dir: Path | None = SHIPPED_DIR) -> tuple[dict[str, Params], Params]:
    """Return ({teacher name: backbone params}, the anchor's frozen text-encoder params) for
    needed_teachers. A teacher is loaded from the workdir or the shipped checkpoints; only one
    that must be trained loads (or trains) what it is fine-tuned from, parents first.

    shipped_dir=None never reuses shipped teachers (to reproduce them from scratch)."""
    made: dict[str, Params] = {}  # name -> {"backbone": ..., and "text" if saved with it}

    def get(name: str) -> Params:
        if name in made:
            return made[name]
        t = config.teachers[name]
        want = recipe(config, name)
        holds_text = saved_with_text(name, t)
        like = {"backbone": init_backbone, **({"text": init_text} if holds_text else {})}

        def make() -> tuple[Params, dict]:
            shipped = find_shipped(shipped_dir, name, want)
            if shipped:
                log.info("teacher %-12s reused (shipped with the package: %s)", name, shipped)
                params, _ = load_params(shipped, like)
                return params, {"made": "shipped"}
            if t.init == "scratch":
                init, text = {"backbone": init_backbone, "text": init_text}, init_text
            else:
                init, text = {"backbone": get(t.init)["backbone"]}, text_of(t.init)
            params = train_teacher(config, name, models, init, text, bucket, mesh, workdir)
            shutil.rmtree(workdir / "teachers" / "_runs" / name, ignore_errors=True)
            log.info("teacher %-12s trained (%d steps)", name, t.steps)
            # A fine-tuned anchor (the omni base) is saved with the frozen text encoder too.
            return {"text": text, **params} if holds_text else params, {"made": "trained"}

        # Saved in the workdir either way, so it alone serves sampling, export and later runs.
        params, _, fresh = cached(workdir / "teachers" / name, want, like, make,
                                  f"teacher {name!r}")
        if not fresh:
            log.info("teacher %-12s reused from %s", name, workdir / "teachers" / name)
        made[name] = params
        return params

    def text_of(name: str) -> Params:
        """The text encoder teacher `name` was trained with: its own, or its parent's."""
        params = get(name)
        return params["text"] if "text" in params else text_of(config.teachers[name].init)

    teachers = {name: get(name)["backbone"] for name in needed_teachers(config, routes)}
    return teachers, text_of("anchor")


def find_shipped(shipped_dir: Path | None, name: str, want: dict) -> Path | None:
    """The shipped checkpoint made with recipe `want`: the family's own `name`, else any other
    family's teacher with that key; None if none is (or `shipped_dir` is None: never reuse)."""
    if shipped_dir is None:
        return None
    for directory in [shipped_dir / name, *sorted(ASSETS_DIR.glob("*/*"))]:
        if _key_at(directory) == want:
            return directory
    return None


def _key_at(directory: Path) -> dict | None:
    """The key of the model saved in `directory`, if any."""
    if not has_params(directory):
        return None
    return key_of(json.loads((directory / "recipe.json").read_text()))


def train_teacher(config: ml_collections.ConfigDict, name: str, models: Models, init: Params,
                  text: Params, bucket: Callable[[str], Bucket], mesh: Mesh,
                  workdir: Path) -> Params:
    """Flow matching on the teacher's bucket (or mix of buckets); the anchor also trains the
    text encoder.

    Resumable: its run checkpoints live under workdir/teachers/_runs/<name> until it is done.
    """
    t = config.teachers[name]
    buckets = teacher_buckets(t)
    optimizer = make_optimizer(t.lr, 0.0, 1.0, min(500, t.steps // 10), decay_steps=t.steps)
    trainable = jax.tree.map(jnp.copy, init)  # the state is donated; never donate a parent
    frozen = {} if "text" in trainable else {"text": text}
    frozen_axes = {} if "text" in trainable else {"text": models.text_axes}
    # One route per bucket, drawn per sample by weight (a single bucket: every sample).
    routes = [Route(f"{name}/{b}", name, b, w) for b, w in buckets.items()]
    # keep_t2i: the routes without source images regress onto the frozen parent (config.teacher)
    keep = frozenset(i for i, r in enumerate(routes)
                     if t.get("keep_t2i") and not has_sources(bucket(r.bucket)))
    if keep:
        frozen["keep"], frozen_axes["keep"] = init["backbone"], models.backbone_axes
    state, frozen, shardings = place_state(mesh, trainable, models.trainable_axes(trainable),
                                           frozen, frozen_axes, optimizer, config.seed)
    step = make_flow_matching_step(models.field(), lambda tr, fr: tr["backbone"],
                                   models.conditioner(t.prompt_dropout), optimizer,
                                   shardings=shardings, keep_routes=keep,
                                   shards=batch_shards(mesh))
    runs = RunCheckpoints(workdir / "teachers" / "_runs" / name)
    if runs.latest_step() is not None:
        state, _ = runs.restore(state)
        log.info("teacher %s: resuming its training at step %d", name, int(state.step))
    batcher = RouteBatcher({b: bucket(b) for b in buckets}, routes, "per_sample", t.batch_size,
                           config.seed, batch_shards(mesh))
    state = fit(lambda s, b, slots: step(s, frozen, b, slots), state, batcher, mesh,
                steps=t.steps, name=f"teacher:{name}", checkpoints=runs,
                checkpoint_every=max(100, t.steps // 8), log_every=100,
                metrics=MetricsWriter(workdir / "teachers" / "metrics.jsonl"),
                steps_per_call=config.training.get("steps_per_call", 1))
    runs.close()
    return to_host(state.trainable)

"""The teachers command: train (or reuse) every teacher a config defines, exactly as the main
job would, and with --ship copy them into the package (danceopd_jax/assets/<name>/) so that the
main job reuses them whenever its recipe matches. This is how the shipped teachers were made
(launch/make_teachers.sh).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from danceopd_jax.config import teacher_buckets, world_kind
from danceopd_jax.core.errors import ConfigError
from danceopd_jax.core.routing import Route
from danceopd_jax.data.store import has_params
from danceopd_jax.eval.shapesbench import Job, ShapesBench, markdown, teacher_tasks
from danceopd_jax.train.mesh import make_mesh
from danceopd_jax.train.teachers import ASSETS_DIR, prepare_teachers, shipped_dir
from danceopd_jax.worlds import build

__all__ = ["ASSETS_DIR", "make_teachers"]  # where --ship copies them: the command line's help


def make_teachers(config: ml_collections.ConfigDict, workdir: str | Path, evaluate: bool = True,
                  reuse_shipped: bool = False, ship: bool = False,
                  only: Sequence[str] = ()) -> str | None:
    """Train (or reuse) every teacher of `config` in `workdir`, or only those named in `only`
    (with what they need: the anchor, whose text encoder everybody uses, and the teachers
    they are fine-tuned from); score them (returns the ShapesBench table) and copy them into
    the package (`ship`) when asked."""
    workdir = Path(workdir).absolute()
    if world_kind(config) != "shapes":
        raise ConfigError("this command trains the shapes world's teachers; a prepared-data "
                          "config's teachers are diffusers checkpoints, which the main job "
                          "converts and caches itself.")
    unknown = sorted(set(only) - set(config.teachers))
    if unknown:
        raise ConfigError(f"--teachers names {unknown}, which the config does not define; "
                          f"choose from {sorted(config.teachers)}.")
    names = list(only) or list(config.teachers)
    world = build(config, workdir)
    chosen = [Route(name, name, config.teachers[name].bucket, 1.0) for name in names]
    teachers, text = prepare_teachers(config, chosen, world.models, world.init_backbone,
                                      world.init_text, world.train, make_mesh(config.mesh),
                                      workdir, shipped_dir(config) if reuse_shipped else None)
    table = None
    if evaluate:
        e = config.eval
        bench = ShapesBench(config, world.models, world.splits, sample_steps=e.sample_steps,
                            num=e.num, batch_size=e.batch_size)
        jobs = [Job(name, teachers[name],
                    tasks=teacher_tasks(list(teacher_buckets(config.teachers[name]))))
                for name in names]
        scores = bench.evaluate(text, jobs, tuple(e.seeds))
        (workdir / "teacher_scores.json").write_text(json.dumps(scores, indent=2))
        table = markdown(scores)
    if ship:
        ship_teachers(config, workdir, names)
    return table


def ship_teachers(config: ml_collections.ConfigDict, workdir: Path,
                  names: Sequence[str] = ()) -> list[str]:
    """Copy the teachers `workdir` trained (of `names`, default all the config's) into the
    package (shipped_dir(config)/<name>) and return their names. One it reused from the
    package (its recipe says "made": "shipped") is left alone: it is already there, maybe under
    another family's folder and name (the omni family's t2i_anchor is the shapes family's
    anchor), and a copy would ship it twice."""
    shipped = []
    for name in names or config.teachers:
        source = workdir / "teachers" / name
        if not has_params(source):
            continue
        if json.loads((source / "recipe.json").read_text()).get("made") == "shipped":
            logging.info("teacher %s was reused from the package; not shipped again", name)
            continue
        dest = shipped_dir(config) / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest)
        logging.info("shipped teacher %s -> %s", name, dest)
        shipped.append(name)
    return shipped

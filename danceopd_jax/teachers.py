"""python -m danceopd_jax.teachers --config=configs/t2i_edit.py --workdir=DIR [--ship]

Trains (or reuses) every teacher a config defines, exactly as the main job would, and with
--ship copies them into the package (danceopd_jax/assets/shapes_teachers/) so that the main job
reuses them whenever its recipe matches. This is how the shipped teachers were made
(launch/make_teachers.sh).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from absl import flags

from danceopd_jax import cli
from danceopd_jax.config import teacher_buckets, world_kind
from danceopd_jax.core.errors import ConfigError
from danceopd_jax.core.routing import Route
from danceopd_jax.eval.shapesbench import Job, ShapesBench, markdown, teacher_tasks
from danceopd_jax.train.distill import build
from danceopd_jax.train.mesh import make_mesh
from danceopd_jax.train.teachers import ASSETS_DIR, prepare_teachers, shipped_dir

_CONFIG = cli.config_flag("config", "configs/t2i_edit.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/teachers", "Where the teachers are trained.")
_EVALUATE = flags.DEFINE_bool("evaluate", True, "Score every teacher with ShapesBench on "
                              "held-out data (config.eval's num, seeds and sample_steps), on "
                              "what its recipe trains: T2I, edits or both.")
_REUSE = flags.DEFINE_bool("reuse_shipped", False,
                           "Reuse shipped teachers whose recipe matches instead of retraining.")
_SHIP = flags.DEFINE_bool("ship", False, f"Copy the finished teachers into {ASSETS_DIR}/"
                          "<config.shipped_teachers>/.")


def main() -> None:
    config, workdir = _CONFIG.value, Path(_WORKDIR.value).absolute()
    if world_kind(config) != "shapes":
        raise ConfigError("this command trains the shapes world's teachers; a prepared-data "
                             "config's teachers are diffusers checkpoints, which the main job "
                             "converts and caches itself.")
    world = build(config, workdir)
    every = [Route(name, name, t.bucket, 1.0) for name, t in config.teachers.items()]
    teachers, text = prepare_teachers(config, every, world.models, world.init_backbone,
                                      world.init_text, world.train, make_mesh(config.mesh),
                                      workdir, shipped_dir(config) if _REUSE.value else None)
    if _EVALUATE.value:
        e = config.eval
        bench = ShapesBench(config, world.models, world.splits, sample_steps=e.sample_steps,
                            num=e.num, batch_size=e.batch_size)
        jobs = [Job(name, teachers[name], tasks=teacher_tasks(list(teacher_buckets(t))))
                for name, t in config.teachers.items()]
        scores = bench.evaluate(text, jobs, tuple(e.seeds))
        (workdir / "teacher_scores.json").write_text(json.dumps(scores, indent=2))
        print(markdown(scores), flush=True)
    if _SHIP.value:  # what this run trained (a reused shipped teacher is already there)
        for name in config.teachers:
            if not (workdir / "teachers" / name).is_dir():
                continue
            dest = shipped_dir(config) / name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(workdir / "teachers" / name, dest)
            logging.info("shipped teacher %s -> %s", name, dest)


if __name__ == "__main__":
    cli.run(main)

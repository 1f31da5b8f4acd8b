"""python -m danceopd_jax.evaluate --workdir=DIR [--split=heldout] [--seeds=0,1,2]
    [--sample_steps=16] [--models=student,anchor,joint_edit] [--num_per_category=32]

Scores a trained workdir's student and teachers with ShapesBench (eval/shapesbench.py):
GenEval-style T2I, GEditBench-style edits, and Frechet distances in a world classifier's
features. Writes <workdir>/eval/shapesbench_<split>_steps<N>.json and .md and prints the
table.
"""

from __future__ import annotations

from absl import app, flags

from danceopd_jax import cli
from danceopd_jax.config import config_errors
from danceopd_jax.core.errors import ConfigError
from danceopd_jax.jobs.evaluate import evaluate_workdir, parse_model

_WORKDIR = cli.workdir_flag()
_SPLIT = flags.DEFINE_enum("split", "heldout", ["heldout", "train"],
                           "Which split the prompts and edit sources come from.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Sampling seeds (mean and std over them).")
_STEPS = cli.sample_steps_flag(16)
_MODELS = flags.DEFINE_list(
    "models", None, "Models to score: 'student' and/or teacher names, each optionally with a "
    "CFG scale (anchor@cfg3.5). Default: the student, the anchor and the routed teachers.")
_NUM = flags.DEFINE_integer("num_per_category", 32, "Prompts / edits per category.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Sampling batch (default: config.eval's).")
_FD = flags.DEFINE_bool("fd", True, "Also compute Frechet distances (trains the classifier "
                        "once, about two minutes on a 2-core CPU).")
_CACHE = flags.DEFINE_string("cache_dir", None, "Where the FD classifier is cached "
                             "(default: <workdir>/data/fd_classifier).")


def main() -> None:
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError:
        raise app.UsageError(f"--seeds={','.join(_SEEDS.value)}: pass integers, e.g. 0,1,2") \
            from None
    with config_errors():  # before anything loads
        for spec in _MODELS.value or []:
            parse_model(spec)
    for flag, value in (("sample_steps", _STEPS.value), ("num_per_category", _NUM.value),
                        ("batch_size", _BATCH.value or 1)):
        if value < 1:
            raise ConfigError(f"--{flag}={value}: it must be at least 1.")
    _, path = evaluate_workdir(_WORKDIR.value, models=_MODELS.value, split=_SPLIT.value,
                               seeds=seeds, sample_steps=_STEPS.value, num=_NUM.value,
                               batch_size=_BATCH.value, fd=_FD.value, cache_dir=_CACHE.value)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    cli.run(main)

"""python -m danceopd_jax.main --config=configs/t2i_edit.py [--workdir=DIR] [--config.x.y=v]

Prepares (or reuses) the teachers, trains the student with config.method (DanceOPD, or a
baseline: README "Methods"), writes checkpoints, metrics and sample grids to the workdir, and
prints held-out scores at the end. Rerunning with the same workdir resumes where the last run
stopped.
"""

from __future__ import annotations

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from danceopd_jax.train import cluster, distill
from danceopd_jax.train.loop import Preempted

_CONFIG = config_flags.DEFINE_config_file("config", "configs/t2i_edit.py",
                                          "Experiment config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "Directory for teachers, checkpoints, metrics, samples.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run that JAX "
    "does not detect by itself (TPU pods and SLURM are detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --flag=value.")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes
    logging.getLogger("danceopd_jax").setLevel(logging.INFO)
    cluster.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        distill.run(_CONFIG.value, _WORKDIR.value)
    except Preempted as e:  # the checkpoint is saved: stop cleanly, the next start resumes
        logging.getLogger("danceopd_jax").warning("%s", e)


if __name__ == "__main__":
    app.run(main)

"""python -m danceopd_jax.main --config=configs/t2i_edit.py [--workdir=DIR] [--config.x.y=v]

Prepares (or reuses) the teachers, trains the student with config.method (DanceOPD, or a
baseline: README "Methods"), writes checkpoints, metrics and sample grids to the workdir, and
prints held-out scores at the end. Rerunning with the same workdir resumes where the last run
stopped. Exit statuses: README "When things go wrong" (42: preempted, rerun to resume).
"""

from __future__ import annotations

import runpy
import shlex
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from danceopd_jax import cli
from danceopd_jax.core.errors import NonFiniteLossError
from danceopd_jax.jobs.distill import main_job

_CONFIG = cli.config_flag("config", "configs/t2i_edit.py", "Experiment config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "Directory for teachers, checkpoints, metrics, samples.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run that JAX "
    "does not detect by itself (TPU pods and SLURM are detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main() -> None:
    try:
        main_job(_CONFIG.value, _WORKDIR.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                 _PROCESS_ID.value)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e} For example: {rerun_command(_CONFIG.value)}") from e


def rerun_command(config: ml_collections.ConfigDict) -> str:
    """This command line with a rate that can resume: the config file's own rate where an
    override raised it, otherwise a tenth of the rate."""
    key = "--config.training.lr="
    args = [a for a in sys.argv[1:] if not a.startswith(key)]
    lr = config.training.lr
    if "training.lr" in config_flags.get_override_values(flags.FLAGS["config"]):
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        file_lr = runpy.run_path(path)["get_config"]().training.lr
        if file_lr < lr:
            return shlex.join(["python", "-m", "danceopd_jax.main", *args])
    return shlex.join(["python", "-m", "danceopd_jax.main", *args, f"{key}{lr / 10:g}"])


if __name__ == "__main__":
    cli.run(main)

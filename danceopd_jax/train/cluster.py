"""Joining a multi-process JAX run (TPU pod slices, multi-node GPU, N processes on one host).

JAX's multi-controller runtime is the distributed engine: every process runs the same program
on its own devices, and jax.distributed connects them. On TPU pods and under SLURM it finds the
coordinator by itself; elsewhere (a local multi-process run) pass it explicitly.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def detected_cluster() -> str | None:
    """The multi-host environment JAX can auto-configure from, if this process is in one."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get(
            "MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Connect this process to the others; a no-op for a plain single-process run.

    Explicit arguments (all three) win; otherwise a detected TPU pod or SLURM job is joined
    automatically."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("a multi-process run needs --coordinator_address, --num_processes and "
                         "--process_id together (e.g. localhost:12355, 2, 0); pass all three "
                         "or none.")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}).")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif (cluster := detected_cluster()) is not None:
        log.info("joining the %s job's processes", cluster)
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


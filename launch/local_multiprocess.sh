#!/usr/bin/env bash
# N processes of the main job on this machine, joined over localhost (JAX's multi-controller
# runtime; CPU collectives go over gloo). Each process feeds only its own batch shards.
#   NPROC=2 DEVICES_PER_PROC=1 launch/local_multiprocess.sh --config=configs/t2i_edit.py \
#       --workdir=runs/mp [--config.x=y ...]
# Ctrl-C / SIGTERM to any process: all of them save the same step and exit with status 42
# (preempted; README "When things go wrong"), which this script returns: rerun to resume.
set -euo pipefail
NPROC=${NPROC:-2}
DEVICES_PER_PROC=${DEVICES_PER_PROC:-1}
PORT=${PORT:-12355}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROC} ${XLA_FLAGS:-}"
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < NPROC; i++)); do
  python -m danceopd_jax.main --coordinator_address="localhost:${PORT}" \
    --num_processes="${NPROC}" --process_id="${i}" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"

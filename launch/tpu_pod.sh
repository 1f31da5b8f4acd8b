#!/usr/bin/env bash
# The main job on every worker of a Cloud TPU VM pod slice (e.g. v5p-64 = 8 hosts x 4 chips).
# jax.distributed finds the coordinator by itself on TPU VMs; every host runs the same command.
#   TPU=my-v5p-64 ZONE=us-east5-a REPO_URL=https://github.com/<you>/danceopd_jax.git \
#       launch/tpu_pod.sh --config=configs/t2i_edit.py --workdir=gs://bucket/runs/x \
#       --config.mesh.data=1 --config.mesh.fsdp=-1
# The workdir must be shared by all hosts (a gs:// bucket or a mounted filesystem) so Orbax can
# write and restore one checkpoint from every host. A preempted slice gets SIGTERM: every host
# saves the same step and exits with status 42 (preempted; README "When things go wrong");
# rerun this command to resume.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${REPO_URL:?set REPO_URL}"
DIR=${DIR:-danceopd_jax}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  [ -d $DIR ] || git clone $REPO_URL $DIR
  cd $DIR && git pull --ff-only
  pip install -q 'jax[tpu]' -r requirements.txt && pip install -q --no-deps -e .
  python -m danceopd_jax.main $ARGS"

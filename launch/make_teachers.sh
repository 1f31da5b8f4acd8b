#!/usr/bin/env bash
# Reproduces shipped teachers with their recipes and seeds (config.teachers.*).
#
#   bash launch/make_teachers.sh [shapes]   the teachers in danceopd_jax/assets/shapes_teachers/:
#       the T2I anchor and joint-edit teacher of configs/t2i_edit_budget.py. Made on one GPU
#       and this CPU (see docs/teachers.md); on 2 CPU cores it takes many hours.
#   bash launch/make_teachers.sh omni       the omni teacher family of configs/t2i_edit.py
#       (an omni base fine-tuned from the shipped T2I anchor, then joint-, local- and
#       global-edit teachers fine-tuned from it) into danceopd_jax/assets/omni_teachers/, scored
#       with ShapesBench. Sized for 2 CPU cores: about 40 minutes for the base, an hour for the
#       joint-edit teacher's first stage and 35 minutes for its second, 35 minutes each for the
#       local one and each of the global one's two stages, on stop 17's cores (docs/teachers.md);
#       resumable (rerun the same command).
# Extra arguments go to every `python -m danceopd_jax.teachers` call. On the device machine
# (no ml_collections there: its wheel in .whl/) the wheels are installed first.
set -euo pipefail
WORKDIR=${WORKDIR:-runs/teachers}
FAMILY=${1:-shapes}
shift || true
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
teachers() { python3 -m danceopd_jax.teachers --ship "$@"; }
case "$FAMILY" in
  shapes)
    teachers --config=configs/t2i_edit_budget.py --workdir="$WORKDIR" "$@" ;;
  omni)
    start=$SECONDS
    teachers --config=configs/t2i_edit.py --workdir="$WORKDIR/omni" "$@"
    echo "omni family trained, scored and shipped in $((SECONDS - start)) s" ;;
  *)
    echo "unknown family '$FAMILY': use shapes or omni" >&2; exit 2 ;;
esac

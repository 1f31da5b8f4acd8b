#!/usr/bin/env bash
# Reproduces the teachers shipped in danceopd_jax/assets/shapes_teachers/ with their recipes
# and seeds (config.teachers.*): the anchor and joint-edit teacher of configs/t2i_edit.py, then
# the local- and global-edit teachers of configs/edit_fusion.py (the anchor is reused).
# Made on one GPU (see docs/teachers.md); on 2 CPU cores it takes many hours.
set -euo pipefail
WORKDIR=${WORKDIR:-runs/teachers}
python -m danceopd_jax.teachers --config=configs/t2i_edit.py --workdir="$WORKDIR" --ship "$@"
python -m danceopd_jax.teachers --config=configs/edit_fusion.py --workdir="$WORKDIR" --ship "$@"

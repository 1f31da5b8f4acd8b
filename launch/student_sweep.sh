#!/usr/bin/env bash
# Variants of a main job (CONFIG, default configs/t2i_edit_budget.py, shipped teachers), run
# side by side on one GPU, then a table of their final held-out scores and score-vs-step curves. Each line of
# SWEEP (a file, default launch/student_sweep.txt) is "name --config.a=b ...". On the device
# machine (no ml_collections there: its wheel in .whl/):
#     bash launch/student_sweep.sh                  # workdirs and table in ${OUT:-runs/sweep}/
# Measured on one H100 (docs/teachers.md): two variants at once compiled in 77 s and ran 1,200
# steps (score curve included) in about 2 minutes; nine at once spent 5 minutes compiling on the
# 16 CPU cores, so keep PARALLEL small.
set -euo pipefail
OUT=${OUT:-runs/sweep}
SWEEP=${SWEEP:-launch/student_sweep.txt}
CONFIG=${CONFIG:-configs/t2i_edit_budget.py}
PARALLEL=${PARALLEL:-2}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.1}
run_one() {
  local name=$1; shift
  local start=$SECONDS
  python3 -m danceopd_jax.main --config="$CONFIG" --workdir="$OUT/$name" \
    --config.eval.curve_every=200 "$@" > "$OUT/$name.log" 2>&1 \
    && echo "$name done in $((SECONDS - start)) s" || echo "$name FAILED: see $OUT/$name.log"
}
export -f run_one
export OUT CONFIG
grep -v '^\s*\(#\|$\)' "$SWEEP" | xargs -P "$PARALLEL" -L 1 bash -c 'run_one "$@"' _
python3 launch/sweep_table.py "$OUT" | tee "$OUT/table.md"

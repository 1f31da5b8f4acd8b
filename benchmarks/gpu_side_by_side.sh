#!/usr/bin/env bash
# Ours and the PyTorch peer back to back on one GPU, at SD3.5-Medium shape (random weights),
# then the ratios. One command on the device machine (it lacks diffusers and ml_collections:
# put their wheels in .whl/ first, e.g. `pip download --no-deps -d .whl diffusers==0.42.1
# ml_collections==1.1.0`):
#     bash benchmarks/gpu_side_by_side.sh            # results in ${OUT:-bench_out}/
set -euo pipefail
OUT=${OUT:-bench_out}
# The workload (query, routes) of this config, on both sides; add the same overrides to both.
CONFIG=${CONFIG:-configs/t2i_edit.py}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then pip install -q --no-deps .whl/*.whl; fi
pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# cuDNN fused attention first; if cuDNN rejects the shapes, the XLA attention instead.
python -m danceopd_jax.bench --config="$CONFIG" --preset=sd35m-shape --timed_steps=5 \
  --out="$OUT/ours.json" > "$OUT/ours.txt" 2>&1 || python -m danceopd_jax.bench \
  --config="$CONFIG" --preset=sd35m-shape --nocudnn --timed_steps=5 --out="$OUT/ours.json" \
  > "$OUT/ours_xla.txt" 2>&1
cat "$OUT"/ours*.txt
# torch.compile of the whole model may take minutes; it is measured last.
timeout "${PEER_TIMEOUT:-400}" python benchmarks/torch_peer.py --config="$CONFIG" --preset=sd35m-shape \
  --modes=batched,reference-loop,fwd-bwd,batched-compiled --timed_steps=5 --out="$OUT/peer.json" \
  2>&1 | tee "$OUT/peer.txt" || echo "peer stopped early (timeout or error): see peer.txt"
[ -f "$OUT/peer.json" ] && python benchmarks/compare.py "$OUT/ours.json" "$OUT/peer.json" \
  | tee "$OUT/compare.md"

"""The student's forward+backward, ours and the PyTorch peer's, interleaved in one process.

    python benchmarks/fwd_bwd_side_by_side.py --config=configs/t2i_edit.py --rounds=20

Both run the config's workload (danceopd_jax.jobs.bench.config_workload: the same shapes and
architecture, random weights, float32); each round times one call of ours, then one of the
peer's, so that whatever else the machine runs slows both alike. It prints the median of
each and the median of the per-round ratios (peer time / our time: above 1, ours is faster).
Set XLA_FLAGS / LD_PRELOAD in the environment to measure a candidate change to ours. Both
thread pools live in one process: on a loaded machine PyTorch's spinning OpenMP threads lose
more than XLA's (docs/performance.md, CPU round 2), so compare on a quiet one.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import torch
import torch_peer  # benchmarks/, this script's directory; defines --config
from absl import app, flags

from danceopd_jax.jobs.bench import config_workload, student_grads

_ROUNDS = flags.DEFINE_integer("rounds", 20, "Timed rounds (after 2 warm-up rounds).")
_OUT = flags.DEFINE_string("json", None, "Write the result as JSON here.")


def main(argv: list[str]) -> None:
    del argv
    work = config_workload(flags.FLAGS.config)
    grads, args = student_grads(work)
    peer = torch_peer.Step(work, "cpu", torch.float32, compiled=False)
    ours_s, peer_s = [], []
    for i in range(2 + _ROUNDS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(grads(*args))
        t1 = time.perf_counter()
        peer.fwd_bwd()
        t2 = time.perf_counter()
        if i >= 2:
            ours_s.append(t1 - t0)
            peer_s.append(t2 - t1)
    ratio = statistics.median(p / o for o, p in zip(ours_s, peer_s, strict=True))
    result = {"ours_ms": 1e3 * statistics.median(ours_s),
              "peer_ms": 1e3 * statistics.median(peer_s), "ratio": ratio,
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "ld_preload": os.environ.get("LD_PRELOAD", ""),
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
              "torch_threads": torch.get_num_threads(), "workload": work.spec()}
    print(f"ours {result['ours_ms']:.1f} ms, peer {result['peer_ms']:.1f} ms, "
          f"ours at {ratio:.2f}x the peer's speed (median of {_ROUNDS.value} rounds)")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)

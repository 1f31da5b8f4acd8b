"""Where our student's forward+backward spends its time on the CPU, and what it costs the kernel.

    python benchmarks/fwd_bwd_profile.py --config=configs/t2i_edit.py [--batch=16] [--rounds=20]
    GLIBC_TUNABLES=glibc.malloc.hugetlb=0 python benchmarks/fwd_bwd_profile.py ...  # without

Times the config's forward+backward (danceopd_jax.jobs.bench.student_grads: its shapes-world
model and batch, random weights, float32) alone in this process, and per call reports the wall
time, the process's user and system CPU time and its minor page faults (getrusage). Then it
traces `--traced` calls with jax.profiler and sums XLA's thunks by kind (the fusion's name
without its number: ynn_fusion = the dots and reductions XLA hands to YNNPACK, copy_*_fusion =
layout copies and transposes, ...), summed over XLA's threads, per call.

It runs under whatever GLIBC_TUNABLES the environment gives it (the command lines add
glibc.malloc.hugetlb=1 themselves, danceopd_jax/cli.py; this script does not), so both
settings can be compared; docs/performance.md, "CPU round 3".
"""

from __future__ import annotations

import collections
import json
import os
import re
import resource
import statistics
import tempfile
import time
from pathlib import Path

import jax
from absl import app, flags
from jax.profiler import ProfileData
from ml_collections import config_flags

from danceopd_jax.jobs.bench import config_workload, student_grads

_CONFIG = config_flags.DEFINE_config_file("config", None, "The workload's config file.")
_BATCH = flags.DEFINE_integer("batch", None, "Batch size (default: the config's).")
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Timed calls (after 3 warm-up calls).")
_TRACED = flags.DEFINE_integer("traced", 10, "Calls traced by the profiler (0: none).")
_TOP = flags.DEFINE_integer("top", 12, "Thunk kinds listed.")
_OUT = flags.DEFINE_string("json", None, "Write the result as JSON here.")


def timed_calls(grads, args, rounds: int) -> dict:
    """Medians per call: wall ms, user and system CPU ms, minor page faults."""
    rows = []
    for _ in range(rounds):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        jax.block_until_ready(grads(*args))
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        rows.append((t1 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime,
                     r1.ru_minflt - r0.ru_minflt))
    wall, user, system, faults = (statistics.median(col) for col in zip(*rows, strict=True))
    return {"wall_ms": 1e3 * wall, "user_ms": 1e3 * user, "system_ms": 1e3 * system,
            "minor_faults": int(faults)}


def thunk_kinds(grads, args, calls: int) -> dict[str, float]:
    """CPU milliseconds per call of each kind of XLA thunk, over XLA's threads."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                jax.block_until_ready(grads(*args))
        trace = max(Path(trace_dir).rglob("*.xplane.pb"), key=os.path.getmtime)
        profile = ProfileData.from_file(str(trace))
    kinds: collections.Counter[str] = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA's worker threads
                continue
            for event in line.events:
                if not event.name.startswith("ThunkExecutor"):  # the whole call, not a thunk
                    kinds[re.sub(r"\.\d+$", "", event.name)] += event.duration_ns
    return {kind: ns / 1e6 / calls for kind, ns in kinds.most_common()}


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    if _BATCH.value:
        config.training.batch_size = _BATCH.value
    work = config_workload(config)
    grads, args = student_grads(work)
    for _ in range(3):
        jax.block_until_ready(grads(*args))
    result = {"batch": work.batch, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              **timed_calls(grads, args, _ROUNDS.value)}
    print(f"batch {work.batch}, GLIBC_TUNABLES={result['glibc_tunables']!r}: "
          f"{result['wall_ms']:.1f} ms per call (user {result['user_ms']:.1f} ms, system "
          f"{result['system_ms']:.1f} ms, {result['minor_faults']} minor page faults; "
          f"medians of {_ROUNDS.value})")
    if _TRACED.value:
        kinds = thunk_kinds(grads, args, _TRACED.value)
        result["thunk_ms"] = kinds
        total = sum(kinds.values())
        print(f"XLA thunks, CPU ms per call over its threads (total {total:.1f}):")
        for kind, ms in list(kinds.items())[:_TOP.value]:
            print(f"  {ms:8.2f}  {100 * ms / total:5.1f}%  {kind}")
    if _OUT.value:
        Path(_OUT.value).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)

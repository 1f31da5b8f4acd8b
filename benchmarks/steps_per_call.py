"""The config's DanceOPD step run one step per jitted call and several steps per call
(training.steps_per_call, train/step.consecutive), side by side in one process.

    python benchmarks/steps_per_call.py --config=configs/t2i_edit.py [--per_call=1,10] \
        [--steps=100] [--warmup=20] [--rounds=2] [--json=OUT]

Each setting runs the same steps (numbers warmup .. warmup + steps - 1, so the same query
draws and rollout lengths) of danceopd_jax.jobs.bench's workload for the config: its shapes-
world model and batch, random weights, float32. Per step it reports the wall time (median),
the process's user and system CPU time and its minor page faults (getrusage), and the system
time's share of the CPU time. The settings alternate for `rounds` rounds. The command lines
run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (danceopd_jax/cli.py); this script runs with
whatever the environment gives it. docs/performance.md, "CPU round 7".
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

from danceopd_jax.jobs.bench import bench_workload, config_workload, variants

_CONFIG = config_flags.DEFINE_config_file("config", None, "The workload's config file.")
_PER_CALL = flags.DEFINE_list("per_call", ["1", "10"], "Steps per call, one row each; the "
                              "first is the baseline of the ratios.")
_STEPS = flags.DEFINE_integer("steps", 100, "Timed steps (a multiple of every --per_call).")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed steps first (a multiple of every "
                               "--per_call).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds; each runs every setting once.")
_OUT = flags.DEFINE_string("json", None, "Write the rows as JSON here.")


def main(argv: list[str]) -> None:
    del argv
    per_call = [int(j) for j in _PER_CALL.value]
    bad = [j for j in per_call if j < 1 or _STEPS.value % j or _WARMUP.value % j]
    if bad:
        raise app.UsageError(f"--per_call={bad}: each must be >= 1 and divide --steps="
                             f"{_STEPS.value} and --warmup={_WARMUP.value}.")
    work = config_workload(_CONFIG.value)
    variant = variants(work)[0]  # the config's own DanceOPD step
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '')!r}; {variant.name}, batch {work.batch}, "
          f"{_STEPS.value} timed steps after {_WARMUP.value}")
    rows = []
    for r in range(_ROUNDS.value):
        for j in per_call:
            result, = bench_workload(work, _STEPS.value // j, _WARMUP.value // j, [variant],
                                     log=lambda _: None, per_call=j)
            rows.append({"round": r, **dataclasses.asdict(result)})
    base = [row for row in rows if row["steps_per_call"] == per_call[0]]
    print("| round | steps per call | step ms | user ms / step | system ms / step | "
          "system / CPU | minor faults / step | rollout fwd | step time vs 1st |")
    print("|" + " --- |" * 9)
    for row in rows:
        cpu = row["user_ms"] + row["system_ms"]
        print(f"| {row['round']} | {row['steps_per_call']} | {1e3 * row['step_s']:.1f} | "
              f"{row['user_ms']:.1f} | {row['system_ms']:.1f} | "
              f"{100 * row['system_ms'] / cpu:.1f}% | {row['minor_faults']:.0f} | "
              f"{row['rollout_forwards']:.2f} | "
              f"{row['step_s'] / base[row['round']]['step_s']:.3f}x |")
    if _OUT.value:
        Path(_OUT.value).write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                                "glibc_tunables": os.environ.get(
                                                    "GLIBC_TUNABLES", ""), "rows": rows},
                                               indent=2))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)

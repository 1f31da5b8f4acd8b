"""python -m danceopd_jax.reproduce --preset=cpu|full|smoke [--out=DIR] [--experiments=...]

Runs the paper's comparisons in miniature on the shapes world (jobs/reproduce.py): T2I +
Edit fusion and Local + Global edit fusion for DanceOPD and every baseline, CFG absorption,
and the query ablations, each with several training seeds; scores every run with ShapesBench;
writes docs/results.md (tables: mean ± std over seeds), per-category bar plots, score-vs-step
curves and a gallery per experiment. Rerunning the same command skips finished runs.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
from absl import app, flags

from danceopd_jax import cli
from danceopd_jax.jobs.reproduce import EXPERIMENTS, EXTRA_EXPERIMENTS, PRESETS, Reproduction

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Size of every run.")
_OUT = flags.DEFINE_string("out", None, "Run directory (default runs/reproduce_<preset>).")
_EXPERIMENTS = flags.DEFINE_list(
    "experiments", [e.name for e in EXPERIMENTS], "Which experiments to run (default: the "
    f"paper's comparisons; also {[e.name for e in EXTRA_EXPERIMENTS]}).")
_CONFIGS = flags.DEFINE_string("configs_dir", "configs", "The repository's configs/ folder.")
_RESULTS = flags.DEFINE_string("results", "docs/results.md", "Where the report is written.")
_FIGURES = flags.DEFINE_string("figures", "docs/results", "Where its figures are written.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only rewrite the report from <out>/results.json.")
_INTRO = flags.DEFINE_string("intro", "docs/results_intro.md",
                             "Hand-written text put above the generated tables, if it exists.")


def main() -> None:
    preset = PRESETS[_PRESET.value]
    out = Path(_OUT.value or f"runs/reproduce_{preset.name}")
    every = (*EXPERIMENTS, *EXTRA_EXPERIMENTS)
    unknown = set(_EXPERIMENTS.value) - {e.name for e in every}
    if unknown:
        raise app.UsageError(f"unknown experiments {sorted(unknown)}; choose from "
                             f"{[e.name for e in every]}.")
    reproduction = Reproduction(preset, out, Path(_CONFIGS.value),
                                tuple(e for e in every if e.name in _EXPERIMENTS.value))
    if _REPORT_ONLY.value:
        results = json.loads((out / "results.json").read_text())
    else:
        results = run(reproduction, out)
    intro_file = Path(_INTRO.value)
    intro = [intro_file.read_text() if intro_file.is_file() else "# Results",
             "## How these tables were made", "",
             f"Command: `{results['command']}` (preset `{results['preset']}`).",
             f"Machine: {results['machine']}. Wall time: {results['wall_time_s'] / 60:.1f} min "
             "(all invocations on the run directory; a rerun reuses finished runs).", ""]
    path = reproduction.write_report(results, Path(_RESULTS.value), Path(_FIGURES.value),
                                     "\n".join(intro))
    print(f"wrote {path} and {out / 'results.json'}", flush=True)


def run(reproduction: Reproduction, out: Path) -> dict:
    """Train and score everything (finished runs are reused); write out/results.json."""
    # Seeds of one method share their compiled programs through the persistent cache.
    jax.config.update("jax_compilation_cache_dir", str((out / "jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    t0 = time.perf_counter()
    results = reproduction.run_all()
    # A rerun reuses finished runs: the wall time is the sum over this out dir's invocations.
    with (out / "invocations.jsonl").open("a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "wall_time_s": time.perf_counter() - t0})
                + "\n")
    device = jax.devices()[0]
    results.update(
        command=f"python -m danceopd_jax.reproduce {' '.join(sys.argv[1:])}",
        machine=f"{platform.platform()}, {device.device_kind} ({jax.default_backend()}), jax "
                f"{jax.__version__}, {os.cpu_count()} CPU cores",
        wall_time_s=sum(json.loads(line)["wall_time_s"]
                        for line in (out / "invocations.jsonl").read_text().splitlines()))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    cli.run(main)

"""The paper's comparisons in miniature (METHOD.md 9, ShapesBench): experiments x methods x
seeds, each a run of the main job in its own workdir, scored by the ShapesBench evaluator.

A run's workdir is named by what determines it (config file, preset, resolved overrides,
seed), so an arm that two experiments share (DanceOPD with its default query appears in the
fusion table and in the query ablation) is trained once, and a rerun of the command skips every
run that already has its report (`report.json`). Teachers and the world's data live in one
directory per experiment config and preset, shared by that experiment's runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_collections

from danceopd_jax.config import apply_overrides

log = logging.getLogger(__name__)

Overrides = Mapping[str, Any]  # "a.b.c" -> value, or callable(config) -> value


@dataclass(frozen=True)
class Arm:
    """One row of a table: a method (or a setting of DanceOPD) as config overrides."""

    label: str
    overrides: Overrides = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    config: str  # file under configs/
    arms: tuple[Arm, ...]


def _num_steps(c: ml_collections.ConfigDict) -> int:
    return c.danceopd.num_steps


# METHOD.md 7: every method is a configuration of the same trainer, same optimizer steps.
METHODS = (
    Arm("DanceOPD"),
    Arm("DiffusionOPD (uniform dsigma)", {"method": "diffusion_opd",
                                          "baselines.dsigma": "uniform"}),
    Arm("DiffusionOPD (true dsigma)", {"method": "diffusion_opd", "baselines.dsigma": "true"}),
    Arm("Flow-OPD", {"method": "flow_opd"}),
    Arm("Off-policy", {"method": "off_policy"}),
    Arm("Soft mixing", {"method": "soft_mix"}),
    Arm("Data-mixing SFT", {"method": "sft_mix"}),
    Arm("Weight merging", {"method": "weight_merge"}),
)
QUERY_ARMS = (
    Arm("DanceOPD"),  # low-noise Beta(5, 2), K = 1: the same run as the fusion table's
    Arm("mid noise (Beta(5,5))", {"danceopd.query_bias": "mid"}),
    Arm("high noise (Beta(2,5))", {"danceopd.query_bias": "high"}),
    Arm("K = 4", {"danceopd.query_k": 4}),
    Arm("K = N (dense)", {"danceopd.query_k": _num_steps, "danceopd.query_bias": "dense"}),
)
CFG_ARMS = (
    Arm("teacher alpha 1", {"routes.t2i.cfg_alpha": 1.0}),
    Arm("teacher alpha 3.5", {"routes.t2i.cfg_alpha": 3.5}),
)
EXPERIMENTS = (
    Experiment("t2i_edit", "T2I + Edit fusion (anchor + joint-edit teacher)", "t2i_edit",
               METHODS),
    Experiment("edit_fusion", "Local + Global edit fusion", "edit_fusion", METHODS),
    Experiment("cfg_absorption", "CFG absorption (student sampled without CFG)",
               "cfg_absorption", CFG_ARMS),
    Experiment("query", "Query ablations (T2I + Edit fusion)", "t2i_edit", QUERY_ARMS),
)


@dataclass(frozen=True)
class Preset:
    """How big every run is. `overrides` apply to every run; `teachers` to every teacher."""

    name: str
    seeds: int
    overrides: Overrides
    teachers: Overrides = field(default_factory=dict)
    # Experiment config -> teacher overrides (e.g. cheaper local / global edit teachers).
    experiment_teachers: Mapping[str, Mapping[str, Overrides]] = field(default_factory=dict)
    sample_steps: tuple[int, ...] = (16, 4)


PRESETS = {
    # The paper-sized miniature: the default run's budget (1,200 steps x 32) per method.
    "full": Preset("full", seeds=3, overrides={"eval.curve_every": 200, "eval.curve_num": 32}),
    # What fits 2 CPU cores in under 2 hours: shorter runs, smaller batches and evaluation sets,
    # the local and global edit teachers fine-tuned briefly from the shipped joint-edit teacher.
    "cpu": Preset(
        "cpu", seeds=3,
        overrides={"training.steps": 150, "training.batch_size": 16,
                   "training.checkpoint_every": 150, "training.sample_every": 150,
                   "eval.curve_every": 50, "eval.curve_num": 16, "eval.num_t2i": 48,
                   "eval.num_edit": 48, "baselines.group": 4},
        experiment_teachers={"edit_fusion": {
            "local_edit": {"init": "joint_edit", "steps": 300},
            "global_edit": {"init": "joint_edit", "steps": 300}}}),
    # Seconds per run (the CI test): a tiny world and model, teachers trained for 3 steps.
    "smoke": Preset(
        "smoke", seeds=2,
        overrides={"world.image_size": 12, "world.train_size": 64, "model.width": 32,
                   "model.depth": 2, "model.heads": 2, "model.text_width": 16,
                   "model.text_layers": 1, "model.text_heads": 2, "danceopd.num_steps": 4,
                   "training.steps": 2, "training.batch_size": 8,
                   "training.checkpoint_every": 2, "training.sample_every": 2,
                   "eval.num_t2i": 6, "eval.num_edit": 6, "eval.batch_size": 8,
                   "eval.sample_steps": 4, "eval.curve_every": 1, "eval.curve_num": 4,
                   "baselines.group": 2},
        teachers={"steps": 3, "batch_size": 8}, sample_steps=(4, 2)),
}


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """get_config() of an experiment file (as `--config=<path>` would load it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass --configs_dir=<the "
                                "repository's configs/ folder>.")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run_config(experiment: Experiment, arm: Arm, preset: Preset, seed: int,
               configs_dir: Path) -> ml_collections.ConfigDict:
    """The experiment's config with the preset's sizes, the arm's method and the student's
    training seed."""
    config = load_config_file(configs_dir / f"{experiment.config}.py")
    apply_overrides(config, preset.overrides)
    for name, t in config.teachers.items():
        apply_overrides(t, preset.teachers)
        apply_overrides(t, preset.experiment_teachers.get(experiment.config, {}).get(name, {}))
    apply_overrides(config, arm.overrides)
    config.training.seed = seed  # the teachers (config.seed) stay the same for every seed
    return config


def run_id(config: ml_collections.ConfigDict) -> str:
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:12]


def run_arm(config: ml_collections.ConfigDict, workdir: Path, shared: Path,
            score: Callable[[ml_collections.ConfigDict, Path], dict]) -> dict:
    """Train (or resume) one run, then score its student; cached in workdir/report.json."""
    done = workdir / "report.json"
    if done.is_file():
        return json.loads(done.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("teachers", "data"):  # one copy per experiment config and preset
        (shared / sub).mkdir(parents=True, exist_ok=True)
        if not (workdir / sub).exists():
            os.symlink(shared / sub, workdir / sub, target_is_directory=True)
    from danceopd_jax.train import distill  # noqa: PLC0415 - keeps this module light to import

    t0 = time.perf_counter()
    distill.run(config, workdir)
    report = {"train_s": time.perf_counter() - t0, **score(config, workdir)}
    done.write_text(json.dumps(report, indent=2))
    return report

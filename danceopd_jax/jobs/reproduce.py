"""The paper's comparisons in miniature (METHOD.md 9, ShapesBench): experiments x methods x
seeds, each a run of the main job in its own workdir, scored by the ShapesBench evaluator.

A run's workdir is named by what determines it (config file, preset, resolved overrides,
seed), so an arm that two experiments share (DanceOPD with its default query appears in the
fusion table and in the query ablation) is trained once, and a rerun of the command skips every
run that already has its report (`report.json`). Teachers, the world's data and the reference
scores live in one directory per experiment config and preset, shared by the runs of the
experiments on that config.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from danceopd_jax.config import apply_overrides
from danceopd_jax.core.methods import REGISTRY
from danceopd_jax.data.store import digest
from danceopd_jax.eval.claims import Claim, claims_section
from danceopd_jax.eval.features import DEFAULT_RECIPE, ClassifierRecipe, scene_features
from danceopd_jax.eval.report import category_bars, curves, gallery, results_markdown
from danceopd_jax.eval.shapes import generate_bucket
from danceopd_jax.eval.shapesbench import EDIT_NAMES, T2I_NAMES, Job, ShapesBench
from danceopd_jax.jobs import distill
from danceopd_jax.jobs.evaluate import default_models, workdir_jobs
from danceopd_jax.jobs.workdir import Workdir, load_student, open_workdir
from danceopd_jax.worlds.shapes import student_tasks

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


def method_arms() -> tuple[Arm, ...]:
    """METHOD.md 7: every method of the registry, each variant of it a row; every method is a
    configuration of the same trainer, same optimizer steps."""
    return tuple(Arm(f"{m.label} ({variant})" if variant else m.label, {"method": m.name, **o})
                 for m in REGISTRY.values() for variant, o in m.arms)


METHODS = method_arms()
DANCEOPD = next(a for a in METHODS if a.overrides == {"method": "danceopd"})
# The paper's default (one low-noise query) and its ablations, each with K and bias set.
LOW = Arm("low noise (Beta(5,2)), K = 1", {"danceopd.query_k": 1, "danceopd.query_bias": "low"})
MID = Arm("mid noise (Beta(5,5)), K = 1", {"danceopd.query_k": 1, "danceopd.query_bias": "mid"})
HIGH = Arm("high noise (Beta(2,5)), K = 1", {"danceopd.query_k": 1, "danceopd.query_bias": "high"})
DENSE = Arm("K = N (dense)", {"danceopd.query_k": _num_steps, "danceopd.query_bias": "dense"})
QUERY_ARMS = (
    DANCEOPD,  # the config's own query: the same run as the fusion table's
    LOW, MID, HIGH,
    Arm("K = 4 distinct (Beta(5,2))", {"danceopd.query_k": 4, "danceopd.query_bias": "low"}),
    DENSE,
)
CFG_GUIDED = 3.5
CFG_ARMS = (
    Arm("teacher alpha 1", {"routes.t2i.cfg_alpha": 1.0}),
    Arm(f"teacher alpha {CFG_GUIDED:g}", {"routes.t2i.cfg_alpha": CFG_GUIDED}),
)
# Flow-OPD's reference advantage (the analytic KL) has no expected policy gradient (README
# "Methods"); the sampled log-ratio variant shows what the same machinery does when it can learn.
FLOW_LOG_RATIO = Arm("Flow-OPD (log-ratio advantage)", {
    **next(a.overrides for a in METHODS if a.label == "Flow-OPD"),
    "baselines.advantage": "log_ratio"})
FUSION_ARMS = (*METHODS, FLOW_LOG_RATIO)
EXPERIMENTS = (
    Experiment("t2i_edit", "T2I + Edit fusion (anchor + joint-edit teacher)", "t2i_edit",
               FUSION_ARMS),
    Experiment("edit_fusion", "Local + Global edit fusion", "edit_fusion", FUSION_ARMS),
    Experiment("cfg_absorption", "CFG absorption (student sampled without CFG)",
               "cfg_absorption", CFG_ARMS),
    Experiment("query", "Query ablations (T2I + Edit fusion)", "t2i_edit", QUERY_ARMS),
)
# docs/teachers.md's budget recipes of the T2I + Edit student (runs 6, 7, 10, 11 and the budget
# default), as overrides of configs/t2i_edit_budget.py. Not part of the paper's comparisons:
# run with --experiments=recipes (and --preset=full for each recipe's own budget).
PAPER_QUERY = {"danceopd.num_steps": 16, "danceopd.query_k": 1, "danceopd.query_bias": "low",
               "danceopd.shared_query": False, "routes.t2i.weight": 0.25,
               "routes.edit.weight": 0.75, "training.cooldown_fraction": 0.0,
               "eval.sample_steps": 16}
RECIPE_ARMS = (
    Arm("budget default"),
    Arm("paper query, lr 1e-3, 1,200 steps (run 6)", {**PAPER_QUERY, "training.steps": 1200}),
    Arm("paper query, lr 1e-3, 4,800 steps (run 7)", {**PAPER_QUERY, "training.steps": 4800}),
    Arm("constant rate, 1,900 steps (run 10)",
        {"training.steps": 1900, "training.cooldown_fraction": 0.0}),
    Arm("cool-down, 1,900 steps (run 11)", {"training.steps": 1900}),
)
EXTRA_EXPERIMENTS = (
    Experiment("recipes", "Budget recipes of the T2I + Edit student (docs/teachers.md)",
               "t2i_edit_budget", RECIPE_ARMS),
)

# The paper's claims (METHOD.md 9) as comparisons of the experiments' rows (eval/claims.py).
ON_POLICY = tuple(a.label for a in FUSION_ARMS
                  if a.overrides.get("method") in ("diffusion_opd", "flow_opd"))
SOFT_MIX = next(a for a in METHODS if a.overrides.get("method") == "soft_mix")
CLAIMS = (
    Claim("T2I + Edit: DanceOPD above the best on-policy baseline on edits", "+8.1% GEdit",
          "t2i_edit", DANCEOPD.label, ON_POLICY, "edit"),
    Claim("Local + Global: DanceOPD above the best on-policy baseline on edits",
          "+16.1% GEdit", "edit_fusion", DANCEOPD.label, ON_POLICY, "edit"),
    Claim("hard routing above soft mixing (T2I + Edit, edits)", "+15.2%", "t2i_edit",
          DANCEOPD.label, (SOFT_MIX.label,), "edit"),
    Claim("a low-noise query above a mid-noise one (edits)", "+23.7%", "query", LOW.label,
          (MID.label,), "edit"),
    Claim("a low-noise query above a high-noise one (edits)", "+19.5%", "query", LOW.label,
          (HIGH.label,), "edit"),
    Claim("one query above dense queries (edits)", "up to +22.8%", "query", LOW.label,
          (DENSE.label,), "edit"),
    Claim("T2I kept: the student within 0.1% of the anchor's GenEval", "within 0.1%",
          "t2i_edit", DANCEOPD.label, ("anchor",), "t2i", "within", 0.001),
    Claim(f"CFG absorbed: the student's single pass within 2% of the teacher guided at "
          f"{CFG_GUIDED:g} (two passes per step: half the inference cost)", "half the cost",
          "cfg_absorption", CFG_ARMS[1].label, (f"anchor@cfg{CFG_GUIDED:g}",), "t2i",
          "within", 0.02),
    Claim("a fraction of the training time: DanceOPD's seconds per step against the cheapest "
          "on-policy baseline's (same steps and batch)", "a fraction of the time",
          "t2i_edit", DANCEOPD.label, ON_POLICY, "step_s", "cost"),
)


@dataclass(frozen=True)
class Preset:
    """How big every run is. `overrides` apply to every run; `teachers` to every teacher."""

    name: str
    seeds: int
    overrides: Overrides
    teachers: Overrides = field(default_factory=dict)
    sample_steps: tuple[int, ...] = (16, 4)  # ShapesBench sampling settings reported
    num: int = 32  # ShapesBench prompts / edits per category
    fd_recipe: ClassifierRecipe = DEFAULT_RECIPE


PRESETS = {
    # The paper-sized miniature: the default run's budget (its steps x batch) for every method.
    "full": Preset("full", seeds=3, overrides={
        "eval.curve_every": 200, "eval.curve_num": 8, "eval.final_scores": False}),
    # What fits 2 CPU cores in about an hour: N = 8 rollout steps, 60 steps x 8 samples, small
    # evaluation sets, the shipped teachers. Too small to tell the methods apart: its students
    # stay near their start. Reaching 80% of the main job's edits takes DanceOPD about 1,000 x
    # 16 samples (docs/teachers.md's curve); at that budget per arm the arms cost about 61
    # DanceOPD runs per seed (the dense and Flow-OPD arms 5-6 each, docs/performance.md), some
    # 20 hours for 3 seeds on 2 cores at 0.4 s per step.
    "cpu": Preset(
        "cpu", seeds=3, num=8,
        overrides={"danceopd.num_steps": 8, "training.steps": 60, "training.batch_size": 8,
                   "training.checkpoint_every": 60, "training.sample_every": 60,
                   "eval.curve_every": 20, "eval.curve_num": 4, "eval.final_scores": False,
                   "baselines.group": 4}),
    # Seconds per run (the CI test): a tiny world and model, teachers trained for 3 steps.
    "smoke": Preset(
        "smoke", seeds=2, num=2, sample_steps=(4, 2),
        overrides={"world.image_size": 12, "world.train_size": 64, "model.width": 48,
                   "model.depth": 2, "model.heads": 2, "model.text_width": 16,
                   "model.text_layers": 1, "model.text_heads": 2, "danceopd.num_steps": 4,
                   "training.steps": 2, "training.batch_size": 4,
                   "training.checkpoint_every": 2, "training.sample_every": 2,
                   "eval.batch_size": 12, "eval.sample_steps": 2, "eval.curve_every": 1,
                   "eval.curve_num": 1, "eval.final_scores": False, "baselines.group": 2},
        teachers={"steps": 3, "batch_size": 8},
        fd_recipe=ClassifierRecipe(num_train=32, num_heldout=16, width=4, cell_features=2,
                                   steps=3, batch_size=16)),
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
    for t in config.teachers.values():
        apply_overrides(t, preset.teachers)
    apply_overrides(config, arm.overrides)
    config.training.seed = seed  # the teachers (config.seed) stay the same for every seed
    return config


def run_id(config: ml_collections.ConfigDict) -> str:
    return digest(json.loads(config.to_json(sort_keys=True)))[:12]


class Reproduction:
    """Runs and scores every (experiment, arm, seed) of a preset under `out`; `results()`
    gathers what the report needs. Everything is resumable: finished runs are skipped."""

    def __init__(self, preset: Preset, out: Path, configs_dir: Path,
                 experiments: tuple[Experiment, ...] = EXPERIMENTS):
        self.preset, self.out, self.configs_dir = preset, Path(out).absolute(), configs_dir
        self.experiments = experiments
        self._benches: dict[str, dict[int, ShapesBench]] = {}

    def shared(self, experiment: Experiment) -> Path:
        """Teachers, world data and reference scores of one experiment config (shared by the
        runs of every experiment on it)."""
        return self.out / "shared" / experiment.config

    def workdir(self, experiment: Experiment, config: ml_collections.ConfigDict) -> Path:
        return self.out / "runs" / experiment.config / run_id(config)

    def run_all(self) -> dict:
        t0 = time.perf_counter()
        results = {}
        for e in self.experiments:
            results[e.name] = {"title": e.title, "config": e.config, "arms": {},
                               "reference": None}
            for arm in e.arms:
                runs = {}
                for seed in range(self.preset.seeds):
                    config = run_config(e, arm, self.preset, seed, self.configs_dir)
                    log.info("%s / %s / seed %d", e.name, arm.label, seed)
                    runs[str(seed)] = self.run(e, config, gallery=seed == 0)
                results[e.name]["arms"][arm.label] = runs
            results[e.name]["reference"] = self.reference(e)
        return {"preset": self.preset.name, "seeds": self.preset.seeds,
                "sample_steps": list(self.preset.sample_steps), "num": self.preset.num,
                "wall_time_s": time.perf_counter() - t0, "experiments": results}

    def run(self, e: Experiment, config: ml_collections.ConfigDict, gallery: bool) -> dict:
        """Train (or resume) one run, then score its student; cached in report.json."""
        workdir = self.workdir(e, config)
        done = workdir / "report.json"
        if done.is_file():
            return json.loads(done.read_text())
        workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("teachers", "data"):
            (self.shared(e) / sub).mkdir(parents=True, exist_ok=True)
            if not (workdir / sub).exists():
                os.symlink(self.shared(e) / sub, workdir / sub, target_is_directory=True)
        t0 = time.perf_counter()
        distill.run(config, workdir)
        train_s = time.perf_counter() - t0
        student = load_student(workdir)
        tasks = student_tasks(config.routes.values())
        job = Job("student", student.params, 1.0, tasks)
        scores = {str(n): bench.score(job, student.text, config.training.seed)
                  for n, bench in self.benches(e, student).items()}
        curve = workdir / "curve.jsonl"
        report = {"train_s": train_s, **training_cost(workdir / "metrics.jsonl",
                                                      config.method),
                  "workdir": str(workdir), "scores": scores,
                  "curve": [json.loads(r) for r in curve.read_text().splitlines()]
                  if curve.is_file() else []}
        if gallery:
            np.savez_compressed(workdir / "gallery.npz", **self.gallery_images(e, student, job))
        done.write_text(json.dumps(report, indent=2))
        return report

    def benches(self, e: Experiment, run: Workdir) -> dict[int, ShapesBench]:
        """One ShapesBench per sampling setting, schedule and world (the samplers compile
        once)."""
        d = run.config.danceopd
        key = json.dumps([run.config.world.to_dict(), d.shift, d.schedule], sort_keys=True)
        if key not in self._benches:
            features = scene_features(run.config.world.image_size,
                                      run.config.world.seed, self.out / "fd_classifier",
                                      self.preset.fd_recipe)
            self._benches[key] = {
                n: ShapesBench(run.config, run.models, run.world.splits, sample_steps=n,
                               num=self.preset.num, batch_size=run.config.eval.batch_size,
                               features=features)
                for n in self.preset.sample_steps}
        return self._benches[key]

    def gallery_images(self, e: Experiment, run: Workdir, job: Job) -> dict[str, np.ndarray]:
        """The first prompt / edit of every category, sampled with 16 (or the preset's
        first) steps and seed 0: the gallery's columns."""
        bench = self.benches(e, run)[self.preset.sample_steps[0]]
        out = {}
        for task in job.tasks:
            data = gallery_rows(bench.sets[task], self.preset.num)
            out[task] = generate_bucket(bench.generators(job.cfg_alpha), job.params,
                                        run.text, data, 0, len(data["target"]))
        return out

    def reference(self, e: Experiment) -> dict:
        """The anchor and the routed teachers (and, for CFG, the guided anchor), scored over
        the preset's seeds at every sampling setting; their gallery columns."""
        config = run_config(e, e.arms[0], self.preset, 0, self.configs_dir)
        done = self.shared(e) / f"reference_{self.preset.name}.json"
        if done.is_file():
            return json.loads(done.read_text())
        run = open_workdir(self.workdir(e, config))  # any run of e: it has the teachers
        specs = default_models(run.config)[1:]
        if e.name == "cfg_absorption":  # the anchor with each teacher guidance scale
            specs = [f"anchor@cfg{a.overrides['routes.t2i.cfg_alpha']:g}" for a in e.arms]
        jobs = workdir_jobs(self.workdir(e, config), run, specs)
        seeds = tuple(range(self.preset.seeds))
        report = {"models": {}, "gallery": {}, "captions": {}}
        self.save_truth(e, run, report)
        for n, bench in self.benches(e, run).items():
            report["models"][str(n)] = bench.evaluate(run.text, jobs, seeds)["models"]
        for job in jobs:
            path = self.shared(e) / f"gallery_{self.preset.name}_{_safe(job.name)}.npz"
            np.savez_compressed(path, **self.gallery_images(e, run, job))
            report["gallery"][job.name] = str(path)
        done.write_text(json.dumps(report, indent=2))
        return report

    def save_truth(self, e: Experiment, run: Workdir, report: dict) -> None:
        """The gallery rows' ground truth (T2I targets; edit sources and targets) and prompts."""
        bench = self.benches(e, run)[self.preset.sample_steps[0]]
        truth = {}
        for task, data in bench.sets.items():
            rows = gallery_rows(data, self.preset.num)
            truth[f"{task}_target"] = rows["target"]
            if task == "edit":
                truth["edit_source"] = rows["source"]
            report["captions"][task] = [json.loads(str(s))["text"] for s in rows["spec"]]
        path = self.shared(e) / f"gallery_{self.preset.name}_truth.npz"
        np.savez_compressed(path, **truth)
        report["gallery_truth"] = str(path)

    def write_report(self, results: dict, markdown_path: Path, figures_dir: Path,
                     intro: str) -> Path:
        """docs/results.md, its figures (bars per category, curves, a gallery each) and, beside
        them, the results it was made from (results_<preset>.json: every per-seed number)."""
        first = str(self.preset.sample_steps[0])
        figures: dict[str, dict[str, Path]] = {}
        for name, exp in results["experiments"].items():
            figs = {}
            for task, names in (("edit", EDIT_NAMES), ("t2i", T2I_NAMES)):
                figs[f"{task} per category"] = category_bars(
                    figures_dir / f"{name}_{task}.png", exp, first, task, names)
                figs[f"{task} vs step"] = curves(figures_dir / f"{name}_curve_{task}.png", exp,
                                                 task)
            ref = exp["reference"]
            images = {m: dict(np.load(p)) for m, p in ref["gallery"].items()}
            for label, runs in exp["arms"].items():
                path = Path(runs["0"]["workdir"]) / "gallery.npz"
                if path.is_file():
                    images[label] = dict(np.load(path))
            figs["gallery"] = gallery(figures_dir / f"{name}_gallery.png", exp,
                                      dict(np.load(ref["gallery_truth"])), images,
                                      ref["captions"])
            figures[name] = {k: os.path.relpath(p, markdown_path.parent)
                             for k, p in figs.items() if p is not None}
        figures_dir.mkdir(parents=True, exist_ok=True)
        (figures_dir / f"results_{results['preset']}.json").write_text(
            json.dumps(results, indent=2) + "\n")
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(results_markdown(results, figures, T2I_NAMES, EDIT_NAMES,
                                                  intro, claims_section(results, CLAIMS)))
        return markdown_path


def training_cost(metrics: Path, phase: str) -> dict:
    """What a run's training steps cost, from its metrics.jsonl: the median seconds per step
    of the logged windows after the first (which holds the compile), and the mean student
    forwards of the rollout per step where the method logs them. {} when nothing was trained
    (weight merging) or too little was logged."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.is_file() else []
    rows = [r for r in rows if r.get("phase") == phase and r.get("steps_per_sec")][1:]
    if not rows:
        return {}
    cost = {"step_s": float(np.median([1.0 / r["steps_per_sec"] for r in rows]))}
    forwards = [r["rollout_forwards"] for r in rows if "rollout_forwards" in r]
    if forwards:
        cost["rollout_forwards"] = float(np.mean(forwards))
    return cost


def gallery_rows(data: Mapping[str, np.ndarray], num: int) -> dict[str, np.ndarray]:
    """Row 0 of every category of a ShapesBench set (its categories come in blocks of num)."""
    rows = np.arange(0, len(data["target"]), num)
    return {k: v[rows] for k, v in data.items()}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)

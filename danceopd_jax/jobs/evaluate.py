"""ShapesBench on a trained workdir: which models to score, and where the reports go.

Models are named as on the command line: "student" or a teacher under
``<workdir>/teachers/``, optionally with a CFG scale, "anchor@cfg3.5". A teacher is scored on
what it was trained for (its recipe's buckets: T2I, edits or both) and, unless given, at the
CFG scale the workdir's routes query it with; the student on both tasks, without CFG.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from danceopd_jax.config import routes_of, teacher_buckets
from danceopd_jax.data.store import key_of
from danceopd_jax.eval.features import DEFAULT_RECIPE, ClassifierRecipe, scene_features
from danceopd_jax.eval.shapesbench import Job, ShapesBench, markdown, teacher_tasks
from danceopd_jax.jobs.workdir import Workdir, load_student, load_teacher, open_workdir

CFG_TAG = "@cfg"


def default_models(config: ml_collections.ConfigDict) -> list[str]:
    """The student, the anchor and every routed teacher of a run's config."""
    routed = [r.teacher for r in routes_of(config)]
    return ["student", *dict.fromkeys(["anchor", *routed])]


def parse_model(spec: str) -> tuple[str, float | None]:
    """"anchor@cfg3.5" -> ("anchor", 3.5); "student" -> ("student", None)."""
    name, tag, alpha = spec.partition(CFG_TAG)
    try:
        if not name or (tag and float(alpha) <= 0):
            raise ValueError
        return name, float(alpha) if tag else None
    except ValueError:
        raise ValueError(f"model {spec!r} is not NAME or NAME{CFG_TAG}ALPHA (ALPHA > 0), e.g. "
                         f"'student' or 'anchor{CFG_TAG}3.5'.") from None


def workdir_jobs(workdir: str | Path, run: Workdir, specs: Sequence[str]) -> list[Job]:
    """One Job per model spec (see the module docstring); "student" needs `run` to be the
    workdir's Student (load_student), a teacher only its Workdir (open_workdir)."""
    route_alpha = {r.teacher: r.cfg_alpha for r in routes_of(run.config)}
    jobs = []
    for spec in specs:
        name, alpha = parse_model(spec)
        if name == "student":
            jobs.append(Job(spec, run.params, alpha or 1.0))
            continue
        params, recipe = load_teacher(workdir, run, name)
        jobs.append(Job(spec, params, alpha or route_alpha.get(name, 1.0),
                        teacher_tasks(list(teacher_buckets(key_of(recipe)["teacher"])))))
    return jobs


def report_path(workdir: str | Path, split: str, sample_steps: int) -> Path:
    """``<workdir>/eval/shapesbench_<split>_steps<N>.json`` (the markdown beside it, .md)."""
    return Path(workdir) / "eval" / f"shapesbench_{split}_steps{sample_steps}.json"


def evaluate_workdir(workdir: str | Path, *, models: Sequence[str] | None = None,
                     split: str = "heldout", seeds: Sequence[int] = (0, 1, 2),
                     sample_steps: int = 16, num: int = 32, batch_size: int | None = None,
                     fd: bool = True, cache_dir: str | Path | None = None,
                     recipe: ClassifierRecipe = DEFAULT_RECIPE) -> tuple[dict, Path]:
    """Score a workdir's models with ShapesBench and write the report as JSON and markdown.

    The FD classifier (made by `recipe`) is cached in `cache_dir` (default
    ``<workdir>/data/fd_classifier``); batch_size defaults to the workdir's
    config.eval.batch_size. Returns (report, JSON path)."""
    workdir = Path(workdir).absolute()
    run = open_workdir(workdir)
    specs = list(models or default_models(run.config))
    if any(parse_model(spec)[0] == "student" for spec in specs):
        run = load_student(workdir, run)  # only the student needs a checkpoint
    config = run.config
    features = scene_features(config.world.image_size, config.world.seed,
                              cache_dir or workdir / "data" / "fd_classifier",
                              recipe) if fd else None
    bench = ShapesBench(config, run.models, run.world.splits, split=split,
                        sample_steps=sample_steps, num=num,
                        batch_size=batch_size or config.eval.batch_size, features=features)
    report = bench.evaluate(run.text, workdir_jobs(workdir, run, specs), seeds)
    report["workdir"] = str(workdir)
    path = report_path(workdir, split, sample_steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    path.with_suffix(".md").write_text(markdown(report))
    return report, path

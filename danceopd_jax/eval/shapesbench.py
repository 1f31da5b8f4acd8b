"""ShapesBench: the paper's two benchmarks, in miniature and with exact ground truth.

- Text to image, GenEval-style: the six GenEval categories (single object, two objects,
  counting, colors, position, color attribution), `num` prompts each, and their plain mean. An
  image passes when the parser recovers everything its prompt asked (and nothing more).
- Editing, GEditBench-style: subject-add, subject-replace, background-change, style-change,
  color-alter, subject-remove (`num` edits each, from the joint-edit bucket, the one holding
  all six), their plain mean, and the plain means over the local (add, replace, recolor,
  remove) and the global (background, style) categories, which the local- and global-edit
  teachers are trained on. Each edit is judged against its exact target: "changed" (the
  instructed change happened), "preserved" (everything else kept) and "correct" (both; the
  combined score). Style changes are also broken down by style (invert, grayscale, outline),
  and T2I images by whether they hold as many objects as the prompt asks for.
- Image quality: the Frechet distance between the generated images and the exact targets of
  the same prompts / edits, in the embedding of a classifier trained on the world
  (eval/features.py), for T2I and for edits separately. FD shrinks with the sample count, so
  compare FDs only at equal `num`.

The prompts and sources are fixed by the world and the split; the sampling noise by the seed
(and the batch size), so the same seed gives the same images. Every number is reported per
seed and as mean and (sample) standard deviation over the seeds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import ml_collections
import numpy as np

from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.data.batches import Bucket
from danceopd_jax.data.shapes import dataset
from danceopd_jax.data.shapes.dataset import Splits
from danceopd_jax.data.shapes.edits import GLOBAL_EDITS, LOCAL_EDITS
from danceopd_jax.data.shapes.prompts import CATEGORIES
from danceopd_jax.eval import report
from danceopd_jax.eval.features import SceneFeatures
from danceopd_jax.eval.frechet import frechet_distance
from danceopd_jax.eval.shapes import EDIT_KEYS, Generators, Verdict, generate_bucket, judge, rates
from danceopd_jax.models.wiring import Models

Params = Any
TASKS = ("t2i", "edit")
T2I_NAMES = {"single_object": "single object", "two_objects": "two objects",
             "counting": "counting", "colors": "colors", "position": "position",
             "color_attr": "color attr."}
# The GEditBench categories, in the paper's order, keyed by the world's edit kinds.
EDIT_NAMES = {"add": "subject-add", "replace": "subject-replace",
              "background": "background-change", "style": "style-change",
              "recolor": "color-alter", "remove": "subject-remove"}
EDIT_BUCKET = "joint_edit"
EDIT_GROUPS = {"local": LOCAL_EDITS, "global": GLOBAL_EDITS}


@dataclass(frozen=True)
class Job:
    """One model to score: its name in the report, its backbone params, the CFG scale it is
    sampled with, and which of TASKS it is scored on."""

    name: str
    params: Params = field(repr=False)
    cfg_alpha: float = 1.0
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self) -> None:
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise ValueError(f"job {self.name!r} has tasks {self.tasks}; use a non-empty subset "
                             f"of {TASKS}.")


def eval_set(splits: Splits, split: str, bucket: str, tasks: Sequence[str], num: int) -> Bucket:
    """The first `num` rows of each task in `split`'s stream of `bucket`, task after task.

    A split's rows do not depend on how many are built (each comes from the same stream), so
    the set is fixed by the world and the split; it is cut from a prefix long enough to hold
    `num` rows of its rarest task (cached in the world's data directory)."""
    missing = set(tasks) - set(dataset.BUCKETS[bucket])
    if missing or num < 1:
        raise ValueError(f"cannot draw {num} rows of each of {sorted(missing) or tasks} from "
                         f"bucket {bucket!r}; it holds {tuple(dataset.BUCKETS[bucket])}, and "
                         "num must be >= 1.")
    w = splits.config.world
    size = 2 * num * len(dataset.BUCKETS[bucket])
    while True:
        data = dataset.load_split(split, bucket, size, w.seed, w.image_size, splits.cache_dir,
                                  splits.tokenizer)
        task = np.asarray(data["task"]).astype(str)
        rows = [np.flatnonzero(task == t)[:num] for t in tasks]
        if all(len(r) == num for r in rows):
            rows = np.concatenate(rows)
            return {k: v[rows] for k, v in data.items()}
        size *= 2


def geneval(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Fraction correct per T2I category, and their plain mean; "object_count" gives per
    category the fraction of images with exactly as many objects as asked for, whatever they
    look like."""
    per = rates(verdicts, "task", ("correct", "object_count"))
    scores = {c: per[c]["correct"] for c in CATEGORIES}
    return {**scores, "mean": float(np.mean(list(scores.values()))),
            "object_count": {c: per[c]["object_count"] for c in CATEGORIES}}


def gedit(verdicts: Sequence[Verdict]) -> dict[str, dict]:
    """changed / preserved / correct per edit category, and their plain means: over all
    categories ("mean") and over each of EDIT_GROUPS ("local", "global"); "by_style" breaks
    the style changes down by style ({style: changed / preserved / correct})."""
    per = rates(verdicts, "task", EDIT_KEYS)
    scores = {k: per[k] for k in EDIT_NAMES}

    def mean(categories: Sequence[str]) -> dict[str, float]:
        return {key: float(np.mean([scores[c][key] for c in categories])) for key in EDIT_KEYS}

    return {**scores, "mean": mean(list(EDIT_NAMES)),
            **{group: mean(kinds) for group, kinds in EDIT_GROUPS.items()},
            "by_style": rates([v for v in verdicts if "style" in v], "style", EDIT_KEYS)}


def teacher_tasks(buckets: Sequence[str]) -> tuple[str, ...]:
    """Which of TASKS a model trained on `buckets` is scored on: T2I for a bucket without
    sources, edits for one with sources (an omni base trained on both: both)."""
    has_source = [dataset.BUCKET_HAS_SOURCE[b] for b in buckets]
    return tuple(t for t, wanted in (("t2i", not all(has_source)), ("edit", any(has_source)))
                 if wanted)


SUMMARIES = {"t2i": geneval, "edit": gedit}


def mean_std(results: Sequence[dict]) -> dict:
    """The same nested dict of numbers with each number replaced by {"mean", "std"} over the
    results (sample std, as in every table of the project: 0 for a single seed)."""
    def stat(*xs: float) -> dict[str, float]:
        m, s = report.mean_std(xs)
        return {"mean": m, "std": s}

    return jax.tree.map(stat, *results)


class ShapesBench:
    """The fixed evaluation sets of one split and one sampling setting; `evaluate` scores any
    number of models on them (the samplers compile once per CFG scale and input shape)."""

    def __init__(self, config: ml_collections.ConfigDict, models: Models, splits: Splits, *,
                 split: str = "heldout", sample_steps: int = 16, num: int = 32,
                 batch_size: int = 128, features: SceneFeatures | None = None):
        if sample_steps < 1:
            raise ValueError(f"sample_steps={sample_steps}; sample with at least 1 Euler step.")
        d = config.danceopd
        self.split, self.sample_steps, self.num, self.features = split, sample_steps, num, features
        self.world_config = config.world
        self.generators = Generators(models.field(), models.conditioner(),
                                     make_sigmas(sample_steps, d.shift, d.schedule))
        self.sets = {"t2i": eval_set(splits, split, "t2i", CATEGORIES, num),
                     "edit": eval_set(splits, split, EDIT_BUCKET, tuple(EDIT_NAMES), num)}
        # Every set has 6 * num rows: one batch shape for both when they fit in one batch.
        self.batch_size = min(batch_size, 6 * num)
        self.real = ({t: features.features(s["target"]) for t, s in self.sets.items()}
                     if features else {})

    def score(self, job: Job, text: Params, seed: int) -> dict:
        """One seed's numbers for one model: {task: summary} and, with features, {"fd": ...}."""
        out: dict[str, Any] = {}
        for task in job.tasks:
            data = self.sets[task]
            images = generate_bucket(self.generators(job.cfg_alpha), job.params, text, data,
                                     seed, self.batch_size)
            out[task] = SUMMARIES[task](judge(images, data))
            if self.features:
                out.setdefault("fd", {})[task] = frechet_distance(
                    self.features.features(images), self.real[task])
        return out

    def evaluate(self, text: Params, jobs: Sequence[Job], seeds: Sequence[int] = (0,)) -> dict:
        """The report: settings, the classifier's record, and per model its CFG scale, mean and
        std over seeds of every number, the per-seed numbers and the wall time."""
        if not seeds:
            raise ValueError("no seeds given; pass at least one sampling seed, e.g. (0, 1, 2).")
        names = [j.name for j in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"job names {names} repeat; give each scored model its own name.")
        results = {}
        for job in jobs:
            t0 = time.perf_counter()
            per_seed = {str(s): self.score(job, text, s) for s in seeds}
            results[job.name] = {"cfg_alpha": job.cfg_alpha, **mean_std(list(per_seed.values())),
                                 "per_seed": per_seed, "wall_time_s": time.perf_counter() - t0}
        return {"split": self.split, "sample_steps": self.sample_steps, "seeds": list(seeds),
                "num_per_category": self.num,
                "world": {"image_size": self.world_config.image_size,
                          "seed": self.world_config.seed},
                "classifier": self.features.info if self.features else None,
                "models": results}


def _stat(stat: dict, digits: int, with_std: bool) -> str:
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if with_std else "")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    """The report as markdown tables: T2I per category, edits' combined score per category,
    T2I's object counts per category, edits' changed / preserved per category (means only;
    the JSON has the stds), and the style changes by style."""
    seeds, models = report["seeds"], report["models"]
    spread = len(seeds) > 1
    has_fd = report["classifier"] is not None
    lines = [f"ShapesBench, {report['split']} split, {report['sample_steps']} sampling steps, "
             f"{report['num_per_category']} prompts / edits per category, seeds "
             f"{', '.join(map(str, seeds))}" + (" (mean ± std over seeds)." if spread else ".")]
    if has_fd:
        acc = report["classifier"]["heldout_accuracy"]
        lines.append("FD: Frechet distance to the exact targets in the features of the world "
                     "classifier (held-out accuracy: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + ").")

    def table(title: str, head: list[str], rows: list[list[str]]) -> None:
        if rows:
            lines.extend(["", f"**{title}**", "", _row(head), _row(["---"] * len(head)),
                          *map(_row, rows)])

    for task, title, names, key in (
            ("t2i", "Text to image (GenEval-style): fraction of images fully correct", T2I_NAMES,
             None),
            ("edit", "Editing (GEditBench-style): fraction changed AND preserved", EDIT_NAMES,
             "correct")):
        rows = []
        for name, m in models.items():
            if task in m:
                stats = [m[task][c] if key is None else m[task][c][key] for c in [*names, "mean"]]
                rows.append([name, f"{m['cfg_alpha']:g}", *(_stat(x, 3, spread) for x in stats),
                             *([_stat(m["fd"][task], 2, spread)] if has_fd else [])])
        table(title, ["model", "CFG", *names.values(), "mean", *(["FD"] if has_fd else [])],
              rows)
    table("Text to image: fraction with exactly as many objects as asked for",
          ["model", *T2I_NAMES.values()],
          [[name, *(_stat(m["t2i"]["object_count"][c], 3, spread) for c in T2I_NAMES)]
           for name, m in models.items() if "t2i" in m])
    table("Editing: changed / preserved", ["model", *EDIT_NAMES.values(), "mean"],
          [[name, *(f"{m['edit'][c]['changed']['mean']:.2f} / "
                    f"{m['edit'][c]['preserved']['mean']:.2f}" for c in [*EDIT_NAMES, "mean"])]
           for name, m in models.items() if "edit" in m])
    edits = {name: m["edit"]["by_style"] for name, m in models.items() if "edit" in m}
    styles = sorted({s for by_style in edits.values() for s in by_style})
    table(f"{EDIT_NAMES['style']} by style: correct (changed / preserved)",
          ["model", *styles],
          [[name, *(f"{_stat(by_style[s]['correct'], 3, spread)} "
                    f"({by_style[s]['changed']['mean']:.2f} / "
                    f"{by_style[s]['preserved']['mean']:.2f})" for s in styles)]
           for name, by_style in edits.items()])
    return "\n".join(lines) + "\n"

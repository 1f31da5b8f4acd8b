"""Tables and plots of results over several seeds: mean +- std, markdown and PNG.

Pure reporting: it reads numbers (and images) and writes text and pictures; it knows nothing
of models or training.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs are an error."""
    v = np.asarray(values, np.float64)
    if v.size == 0 or np.isnan(v).any():
        raise ValueError(f"mean_std needs finite values, got {list(values)}.")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def cell(values: Sequence[float] | None, digits: int = 3) -> str:
    """'m ± s' (sample std) for several seeds, 'm' for one, '-' for none."""
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415 - only the plots need it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - requirements-dev installs it
        raise ImportError("plots need matplotlib: pip install matplotlib (requirements-dev.txt)"
                          ) from e
    return plt


def bar_plot(path: str | Path, categories: Sequence[str],
             series: Mapping[str, Mapping[str, Sequence[float]]], title: str,
             ylabel: str = "score") -> Path:
    """Grouped bars: one group per category, one bar per series (mean, std over seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 0.25 * len(categories) * len(series))),
                                    4.2))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(categories))
    for i, (label, per_cat) in enumerate(series.items()):
        stats = [mean_std(per_cat[c]) if per_cat.get(c) else (math.nan, 0.0) for c in categories]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [m for m, _ in stats], width,
               yerr=[s for _, s in stats], label=label, capsize=2)
    ax.set_xticks(x, categories, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def curve_plot(path: str | Path, curves: Mapping[str, Mapping[int, Sequence[float]]],
               title: str, ylabel: str) -> Path:
    """Score against training step, one line per method (mean, shaded std over seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for label, by_step in curves.items():
        steps = sorted(by_step)
        stats = np.array([mean_std(by_step[s]) for s in steps])
        ax.plot(steps, stats[:, 0], marker="o", markersize=3, label=label)
        ax.fill_between(steps, stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1], alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    fig.clf()
    return path


# The results of the reproduce command (jobs/reproduce.py) as docs/results.md + figures.
# A "row" is a list of per-seed ShapesBench score dicts ({"t2i": ..., "edit": ..., "fd": ...}):
# a method's over training seeds, or a reference model's over sampling seeds.

def _get(scores: Mapping, *path: str) -> float | None:
    for p in path:
        if not isinstance(scores, Mapping) or p not in scores:
            return None
        scores = scores[p]
    return float(scores)


def _values(rows: Sequence[Mapping], *path: str) -> list[float]:
    return [v for v in (_get(r, *path) for r in rows) if v is not None]


def experiment_rows(exp: Mapping, steps: str) -> dict[str, list[Mapping]]:
    """{row label: per-seed score dicts at `steps` sampling steps}: reference models first
    (over sampling seeds), then every arm (over training seeds)."""
    rows: dict[str, list[Mapping]] = {}
    for name, m in exp["reference"]["models"][steps].items():
        label = f"{name} (teacher)" if name != "anchor" else "anchor"
        rows[label] = list(m["per_seed"].values())
    for label, runs in exp["arms"].items():
        rows[label] = [r["scores"][steps] for r in runs.values()]
    return rows


def main_table(exp: Mapping, steps: Sequence[str]) -> str:
    first, *rest = steps
    rows = experiment_rows(exp, first)
    others = {s: experiment_rows(exp, s) for s in rest}
    def cost(key: str, scale: float = 1.0) -> dict[str, list[float]]:
        return {label: [r[key] * scale for r in runs.values() if key in r]
                for label, runs in exp["arms"].items()}

    train_min, step_s, forwards = cost("train_s", 1 / 60), cost("step_s"), cost(
        "rollout_forwards")
    header = ["model", f"GenEval ({first} steps)", "GEdit correct", "changed", "preserved",
              "FD T2I", "FD edit", *(f"GenEval / GEdit ({s} steps)" for s in rest),
              "train min", "s / step", "rollout forwards / step"]
    body = []
    for label, r in rows.items():
        extra = [f"{cell(_values(others[s][label], 't2i', 'mean'))} / "
                 f"{cell(_values(others[s][label], 'edit', 'mean', 'correct'))}" for s in rest]
        body.append([label, cell(_values(r, "t2i", "mean")),
                     cell(_values(r, "edit", "mean", "correct")),
                     cell(_values(r, "edit", "mean", "changed")),
                     cell(_values(r, "edit", "mean", "preserved")),
                     cell(_values(r, "fd", "t2i"), 1), cell(_values(r, "fd", "edit"), 1),
                     *extra, cell(train_min.get(label), 1), cell(step_s.get(label), 2),
                     cell(forwards.get(label), 1)])
    return markdown_table(header, body)


def category_table(exp: Mapping, steps: str, task: str, names: Mapping[str, str]) -> str:
    rows = experiment_rows(exp, steps)
    key = ("correct",) if task == "edit" else ()
    body = [[label, *(cell(_values(r, task, c, *key)) for c in names)]
            for label, r in rows.items() if _values(r, task, "mean", *key)]
    return markdown_table(["model", *names.values()], body) if body else ""


def category_bars(path: Path, exp: Mapping, steps: str, task: str,
                  names: Mapping[str, str]) -> Path | None:
    key = ("correct",) if task == "edit" else ()
    series = {label: {names[c]: _values(r, task, c, *key) for c in names}
              for label, r in experiment_rows(exp, steps).items()
              if _values(r, task, "mean", *key)}
    if not series:
        return None
    what = "GEditBench-style, changed AND preserved" if task == "edit" else "GenEval-style"
    return bar_plot(path, list(names.values()), series,
                    f"{exp['title']}: {what} ({steps} steps)")


def curves(path: Path, exp: Mapping, task: str) -> Path | None:
    """Score vs step, one line per arm (mean over training seeds)."""
    lines = {}
    for label, runs in exp["arms"].items():
        by_step: dict[int, list[float]] = {}
        for r in runs.values():
            for row in r["curve"]:
                if row.get(task) is not None:
                    by_step.setdefault(int(row["step"]), []).append(float(row[task]))
        if len(by_step) > 1:
            lines[label] = by_step
    if not lines:
        return None
    ylabel = "GEdit-style mean (correct)" if task == "edit" else "GenEval-style mean"
    return curve_plot(path, lines, f"{exp['title']}: quick held-out score", ylabel)


def gallery(path: Path, exp: Mapping, truth: Mapping[str, np.ndarray],
            images: Mapping[str, Mapping[str, np.ndarray]], captions: Mapping[str, list[str]],
            ) -> Path | None:
    """One grid per experiment: a row per category's first prompt / edit; columns: the
    ground truth (edits: source | target), then each model (`images`: column -> task -> [R,
    H, W, 3])."""
    from danceopd_jax.eval.grids import save_grid  # noqa: PLC0415

    rows, texts, columns = [], [], []
    for task, truth_cols in (("t2i", ["target"]), ("edit", ["source", "target"])):
        models = [name for name, per_task in images.items() if task in per_task]
        if not models or f"{task}_target" not in truth:
            continue
        columns.append(f"{task}: " + " | ".join([*truth_cols, *models]))
        columns[-1:] = textwrap.wrap(columns[-1], 150)
        for i, caption in enumerate(captions[task]):
            rows.append([truth[f"{task}_{c}"][i] for c in truth_cols]
                        + [images[m][task][i] for m in models])
            texts.append(caption)
    if not rows:
        return None
    return save_grid(path, rows, texts, "\n".join([f"{exp['title']}. Columns:", *columns]))


def results_markdown(results: Mapping, figures: Mapping[str, Mapping[str, Path]],
                     t2i_names: Mapping[str, str], edit_names: Mapping[str, str],
                     intro: str = "", claims: str = "") -> str:
    """docs/results.md: the claims (right under the intro's title), then per experiment the
    main table, the per-category tables, DanceOPD against each baseline, and the figures
    (paths relative to the markdown file)."""
    steps = [str(s) for s in results["sample_steps"]]
    title, _, intro = intro.partition("\n") if intro.startswith("# ") else ("", "", intro)
    out = [title, ""] if title else []
    if claims:
        out += [claims.rstrip(), ""]
    out += [intro.strip() + "\n"] if intro.strip() else []
    for name, exp in results["experiments"].items():
        out += [f"## {exp['title']}", "",
                f"Config `configs/{exp['config']}.py`, preset `{results['preset']}`; methods: "
                f"mean ± std over {results['seeds']} training seeds; teachers: over "
                f"{results['seeds']} sampling seeds. {results['num']} held-out prompts / edits "
                "per category.", "", main_table(exp, steps), ""]
        for task, names, what in (("t2i", t2i_names, "GenEval-style categories"),
                                  ("edit", edit_names, "GEditBench-style categories (correct)")):
            table = category_table(exp, steps[0], task, names)
            if table:
                out += [f"{what}, {steps[0]} steps:", "", table, ""]
        if "DanceOPD" in exp["arms"]:
            out += [versus_danceopd(exp, steps[0]), ""]
        for label, path in figures.get(name, {}).items():
            out += [f"![{label}]({path})", ""]
    return "\n".join(out)


def versus_danceopd(exp: Mapping, steps: str) -> str:
    """DanceOPD's mean minus each other arm's mean, on edits and on T2I."""
    rows = experiment_rows(exp, steps)
    ours = rows["DanceOPD"]
    body = []
    for label, r in rows.items():
        if label == "DanceOPD" or label not in exp["arms"]:
            continue
        diffs = []
        for path in (("edit", "mean", "correct"), ("t2i", "mean")):
            a, b = _values(ours, *path), _values(r, *path)
            diffs.append(f"{np.mean(a) - np.mean(b):+.3f}" if a and b else "-")
        body.append([label, *diffs])
    return ("DanceOPD minus each method (difference of the means over seeds; positive = "
            f"DanceOPD higher), {steps} steps:\n\n"
            + markdown_table(["method", "GEdit correct", "GenEval"], body))

"""Tables and plots of results over several seeds: mean +- std, markdown and PNG.

Pure reporting: it reads numbers (and images) and writes text and pictures; it knows nothing
of models or training.
"""

from __future__ import annotations

import math
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
    """'m +- s (n)' for several seeds, 'm' for one, '-' for none."""
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
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(categories) * max(1, len(series)) / 3),
                                    3.6))
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

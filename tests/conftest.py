"""Shared helpers: experiment configs at a size that trains in seconds on 2 CPU cores."""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

# The tests' models are tiny, so compiling is most of their time: XLA's CPU backend skips its
# expensive optimisations (a tiny main job: 140 s -> 69 s on 2 cores). Benchmarks and real runs
# keep XLA's defaults.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
# One persistent compilation cache for the whole session, set before anything imports jax: in
# this process and in every command line a test starts (they inherit the environment), the
# tiny models' programs are compiled once, not once per test. The process that made it
# removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="danceopd-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# Command lines restart once to give glibc's malloc huge pages (danceopd_jax/cli.py,
# use_huge_pages); the ones the tests start have them from the start.
from danceopd_jax.cli import with_huge_pages  # noqa: E402 - imports no jax

os.environ["GLIBC_TUNABLES"] = with_huge_pages(os.environ.get("GLIBC_TUNABLES", ""))

import ml_collections  # noqa: E402 - after the environment above, before jax loads
import pytest  # noqa: E402

from danceopd_jax.config import apply_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# The same backbone family as the default, shrunk: 12 px images (3x3 patches of 4 px; a
# token as wide as its 4x4x3 pixel values).
TINY = {
    "world.image_size": 12, "world.train_size": 64,
    "model.width": 48, "model.depth": 2, "model.heads": 2, "model.text_width": 16,
    "model.text_layers": 1, "model.text_heads": 2,
    "danceopd.num_steps": 4,
    "training.steps": 4, "training.batch_size": 4, "training.checkpoint_every": 2,
    "training.sample_every": 2, "training.log_every": 1,
    # Tests stop runs early by lowering training.steps, which would move a cool-down.
    "training.cooldown_fraction": 0.0,
    # ShapesBench's final scores: 1 prompt / edit per category, one seed, one batch each.
    "eval.num": 1, "eval.seeds": (0,), "eval.batch_size": 6, "eval.sample_steps": 4,
}


def load_module(path: Path):
    """A Python file of the repository that is not in the package (a config, an example, a
    launch script), imported as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name: str) -> ml_collections.ConfigDict:
    return load_module(ROOT / "configs" / f"{name}.py").get_config()


def pythonpath_env() -> dict[str, str]:
    """This checkout first on the subprocess's path (the package may be installed elsewhere)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def tiny_config(name: str = "t2i_edit", **overrides) -> ml_collections.ConfigDict:
    config = apply_overrides(load_config(name), {**TINY, **overrides})
    for t in config.teachers.values():
        t.steps, t.batch_size = 3, 8
    return config


def tiny_flags(name: str = "t2i_edit") -> list[str]:
    """The same tiny settings as command-line overrides of the main job."""
    config = load_config(name)
    flags = [f"--config.{k}={v}" for k, v in TINY.items()]
    for t in config.teachers:
        flags += [f"--config.teachers.{t}.steps=3", f"--config.teachers.{t}.batch_size=8"]
    return flags


def losses(workdir: Path) -> dict[int, float]:
    """The DanceOPD losses a run logged, by step."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["phase"] == "danceopd"}


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """One tiny main-job run (teachers trained from scratch), shared by the tests."""
    from danceopd_jax.jobs import distill

    workdir = tmp_path_factory.mktemp("run")
    scores = distill.run(tiny_config(), workdir)
    return workdir, scores


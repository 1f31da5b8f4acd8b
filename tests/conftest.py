"""Shared helpers: experiment configs at a size that trains in seconds on 2 CPU cores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from danceopd_jax.config import apply_overrides

ROOT = Path(__file__).resolve().parent.parent

# The same backbone family as the default, shrunk: 12 px images (3x3 patches of 4 px).
TINY = {
    "world.image_size": 12, "world.train_size": 64,
    "model.width": 32, "model.depth": 2, "model.heads": 2, "model.text_width": 16,
    "model.text_layers": 1, "model.text_heads": 2,
    "danceopd.num_steps": 4,
    "training.steps": 4, "training.batch_size": 4, "training.checkpoint_every": 2,
    "training.sample_every": 2, "training.log_every": 1,
    # Tests stop runs early by lowering training.steps, which would move a cool-down.
    "training.cooldown_fraction": 0.0,
    "eval.num_t2i": 4, "eval.num_edit": 4, "eval.batch_size": 4, "eval.sample_steps": 4,
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
    from danceopd_jax.train import distill

    workdir = tmp_path_factory.mktemp("run")
    scores = distill.run(tiny_config(), workdir)
    return workdir, scores


# --------------------------------------------------------------------------- parity helpers

PARITY_STD = 0.2  # weights ~ N(0, STD), norm weights ~ 1 + N(0, STD): no layer is 0 or identity


def randomize(model, seed: int, std: float = PARITY_STD):
    """Every parameter of a torch module drawn at random (1-D ``*weight``: around 1, as a
    norm's scale), so that parity covers every weight; returns the module in eval mode."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = std * rng.standard_normal(tuple(p.shape)).astype(np.float32)
            is_norm_weight = p.ndim == 1 and name.endswith("weight")
            p.copy_(torch.from_numpy(1 + noise if is_norm_weight else noise))
    return model.eval()


def with_params(factory, params: dict) -> nnx.Module:
    """Build abstractly (no init ops to run), then fill in the converted params."""
    graph, state = nnx.split(nnx.eval_shape(factory))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graph, state)

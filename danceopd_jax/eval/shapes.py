"""Sampling fields on the shapes world and judging the samples with its exact parser.

Used by ShapesBench (eval/shapesbench.py), which makes every score of the project, and by the
sample grids and the sample command (the sampler only).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from danceopd_jax.core.errors import ConfigError
from danceopd_jax.core.fields import Field, cfg
from danceopd_jax.core.rollout import sample
from danceopd_jax.data.batches import Bucket, has_sources, model_rows
from danceopd_jax.data.shapes.parser import score_edit, score_t2i

Params = Any
Conditioner = Callable[[Params, dict, jax.Array], dict]
Verdict = dict[str, Any]
EDIT_KEYS = ("changed", "preserved", "correct")


def make_generator(field: Field, conditioner: Conditioner, sigmas: jax.Array,
                   cfg_alpha: float = 1.0) -> Callable:
    """A jitted (params, text_params, batch, key) -> uint8 images sampler of the ODE."""
    guided = cfg(field, cfg_alpha)

    @jax.jit
    def generate(params: Params, text_params: Params, batch: dict, key: jax.Array) -> jax.Array:
        cond = conditioner({"text": text_params}, batch, key)
        z0 = jax.random.normal(key, batch["target"].shape, jnp.float32)
        return to_uint8(sample(guided, params, z0, sigmas, cond))

    return generate


class Generators:
    """One compiled sampler per CFG scale for one sampling schedule, built on first use, so
    scoring many models at the same scale compiles once."""

    def __init__(self, field: Field, conditioner: Conditioner, sigmas: jax.Array):
        self.field, self.conditioner, self.sigmas = field, conditioner, sigmas
        self._built: dict[float, Callable] = {}

    def __call__(self, cfg_alpha: float) -> Callable:
        if cfg_alpha not in self._built:
            self._built[cfg_alpha] = make_generator(self.field, self.conditioner, self.sigmas,
                                                    cfg_alpha)
        return self._built[cfg_alpha]


def to_uint8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def generate_bucket(generate: Callable, params: Params, text_params: Params, bucket: Bucket,
                    seed: int, batch_size: int) -> np.ndarray:
    """Deterministic samples for every row of an evaluation bucket: the same (seed, batch_size)
    gives the same noise for each row, whatever the model."""
    n = len(bucket["target"])
    out = []
    for start in range(0, n, batch_size):
        # Pad the last batch by repeating its final row: one compiled shape for every batch.
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)
        key = jax.random.fold_in(jax.random.key(seed), start)
        batch = model_rows(bucket, rows, has_sources(bucket))
        images = np.asarray(generate(params, text_params, batch, key))
        out.append(images[: min(batch_size, n - start)])
    return np.concatenate(out)


def judge(images: np.ndarray, bucket: Bucket) -> list[Verdict]:
    """The parser's verdict on each row: its "task" (T2I category or edit kind) and "correct"
    (T2I: every attribute the prompt asked; edits: the instructed change made AND the rest
    preserved); T2I rows also carry "object_count" (exactly as many objects as the prompt
    asks for, whatever they look like), edit rows "changed" and "preserved", and style
    changes their "style" (invert, grayscale, outline)."""
    verdicts = []
    for image, spec_json, task in zip(images, bucket["spec"], bucket["task"], strict=True):
        spec = json.loads(str(spec_json))
        task = str(task)
        if "source" in spec:  # edits carry their source scene
            style = {"style": spec["style"]} if spec.get("style") else {}
            verdicts.append({"task": task, **style, **score_edit(image, spec)})
        else:
            result = score_t2i(image, spec)
            # A counting prompt's "count" counts the matching objects, "no_extra" all of them.
            drawn = result["no_extra" if spec["category"] == "counting" else "count"]
            verdicts.append({"task": task, "correct": result["all"], "object_count": drawn})
    return verdicts


def rates(verdicts: Sequence[Verdict], by: str, keys: Sequence[str]) -> dict[str, dict[str,
                                                                                    float]]:
    """{group: {key: fraction true}} over the verdicts grouped by their `by` field."""
    groups: dict[str, list[Verdict]] = {}
    for v in verdicts:
        groups.setdefault(v[by], []).append(v)
    return {g: {k: float(np.mean([v[k] for v in vs])) for k in keys}
            for g, vs in sorted(groups.items())}


def read_source(path: str, size: int, resize: bool) -> np.ndarray:
    """The edit source as uint8 RGB [size, size, 3]; another size or mode needs `resize`, and
    an alpha channel (what would the transparent pixels be?) is refused."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"--source={path}: not a readable image ({e}).") from None
    if "A" in image.getbands() or "transparency" in image.info:
        raise ConfigError(f"--source={path} has an alpha channel ({image.mode}); flatten it onto "
                          "the background you mean and save it as RGB.")
    problems = [f"mode {image.mode}, not RGB"] if image.mode != "RGB" else []
    if image.size != (size, size):
        problems.append(f"{image.size[0]}x{image.size[1]} pixels, not the world's {size}x{size}")
    if problems and not resize:
        raise ConfigError(f"--source={path} is {' and '.join(problems)}; pass --resize to "
                          "convert it (nearest neighbour), or give an image of that size.")
    return np.asarray(image.convert("RGB").resize((size, size), Image.NEAREST))

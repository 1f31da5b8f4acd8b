"""Scoring fields on the shapes world with its exact-ground-truth parser.

Used by the main job to print, at the end, how well the anchor, the teachers and the student
do on held-out T2I prompts and edits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from danceopd_jax.core.fields import Field, cfg
from danceopd_jax.core.rollout import sample
from danceopd_jax.data.batches import Bucket, has_sources, model_rows
from danceopd_jax.data.shapes.parser import score_edit, score_t2i

Params = Any
Conditioner = Callable[[Params, dict, jax.Array], dict]


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


def to_uint8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def generate_bucket(generate: Callable, params: Params, text_params: Params, bucket: Bucket,
                    seed: int, batch_size: int) -> np.ndarray:
    """Deterministic samples for every row of an evaluation bucket (fixed noise per row)."""
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


def score_bucket(images: np.ndarray, bucket: Bucket) -> dict[str, float]:
    """Fraction of rows judged correct: T2I rows by every attribute the prompt asked, edit rows
    by the instructed change AND preservation of the rest; also per task (category / kind)."""
    correct = []
    for image, spec_json in zip(images, bucket["spec"], strict=True):
        spec = json.loads(str(spec_json))
        if "source" in spec:  # edits carry their source scene
            correct.append(score_edit(image, spec)["correct"])
        else:
            correct.append(score_t2i(image, spec)["all"])
    correct = np.asarray(correct, bool)
    tasks = np.asarray(bucket["task"]).astype(str)
    scores = {"score": float(correct.mean())}
    for task in sorted(set(tasks.tolist())):
        scores[task] = float(correct[tasks == task].mean())
    return scores


def edit_breakdown(images: np.ndarray, bucket: Bucket) -> dict[str, dict[str, float]]:
    """Per edit kind (style edits split by style): the fractions where the instructed change
    happened ("changed"), the rest was preserved ("preserved"), and both ("correct")."""
    rows: dict[str, list[dict[str, bool]]] = {}
    for image, spec_json in zip(images, bucket["spec"], strict=True):
        spec = json.loads(str(spec_json))
        kind = spec["kind"] + (f"/{spec['style']}" if spec.get("style") else "")
        rows.setdefault(kind, []).append(score_edit(image, spec))
    return {kind: {k: float(np.mean([r[k] for r in rs])) for k in ("changed", "preserved",
                                                                  "correct")}
            for kind, rs in sorted(rows.items())}

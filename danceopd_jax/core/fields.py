"""Fields: pure functions (params, z, sigma, cond) -> velocity.

A teacher, the student, a classifier-free-guided teacher and any affine combination of fields
are all fields, so the algorithm never needs to know which one it is talking to.

`cond` is a dict. Text entries ("text", "text_mask", "pooled") may be replaced by the empty
prompt's entries stored under cond["null"]; everything else (e.g. the source image of an edit)
is kept, so CFG guides the text only (METHOD.md 4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Params = Any
Cond = dict[str, Any]
Field = Callable[[Params, jax.Array, jax.Array, Cond], jax.Array]


def drop_text(cond: Cond) -> Cond:
    """The unconditional branch: text replaced by the empty prompt, source image kept."""
    if "null" not in cond:
        raise KeyError(
            "cond has no 'null' entry (the empty prompt's text conditioning); CFG needs it. "
            "Build conditions with the null text included."
        )
    null = cond["null"]
    batch = jax.tree.leaves(cond["text"])[0].shape[0]
    null = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:]), null)
    return {**cond, **null}


def cfg(field: Field, alpha: float) -> Field:
    """v = v_uncond + alpha * (v_cond - v_uncond); both branches in one batched call."""
    if alpha == 1.0:
        return field

    def guided(params: Params, z: jax.Array, sigma: jax.Array, cond: Cond) -> jax.Array:
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), per_sample(cond),
                            per_sample(drop_text(cond)))
        v = field(params, jnp.concatenate([z, z]), jnp.concatenate([sigma, sigma]),
                  {**both, "null": cond["null"]})
        v_cond, v_uncond = jnp.split(v, 2)
        return v_uncond + alpha * (v_cond - v_uncond)

    return guided


def affine(terms: Sequence[tuple[float, Field]], atol: float = 1e-6) -> Field:
    """sum_j w_j * field_j, with sum_j w_j = 1; its params are the tuple of the terms' params."""
    if not terms:
        raise ValueError("affine() needs at least one (weight, field) term.")
    total = sum(w for w, _ in terms)
    if abs(total - 1.0) > atol:
        raise ValueError(
            f"affine field weights sum to {total}, not 1 ({[w for w, _ in terms]}); "
            "normalise them (an affine combination of fields keeps sum(w) = 1)."
        )

    def combined(params: Sequence[Params], z: jax.Array, sigma: jax.Array, cond: Cond) -> jax.Array:
        if len(params) != len(terms):
            raise ValueError(f"affine field got {len(params)} params for {len(terms)} terms.")
        return sum(w * f(p, z, sigma, cond) for (w, f), p in zip(terms, params, strict=True))

    return combined


def per_sample(cond: Cond) -> Cond:
    """The per-sample part of cond: everything but the shared empty-prompt entry."""
    return {k: v for k, v in cond.items() if k != "null"}


def map_per_sample(fn: Callable[[jax.Array], jax.Array], cond: Cond) -> Cond:
    """Apply fn to every per-sample array of cond (slicing, repeating), keeping cond["null"]."""
    mapped = jax.tree.map(fn, per_sample(cond))
    return {**mapped, "null": cond["null"]} if "null" in cond else mapped

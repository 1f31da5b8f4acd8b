"""Losses. Each is a pure function of a field, its parameters and one batch.

danceopd_loss is METHOD.md 2 line by line: roll out the current student (stop-gradient) to the
sampled query states, ask the sample's routed teacher for its velocity there (no gradient),
and regress the student's velocity at the same state onto it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from danceopd_jax.core.fields import Cond, Field, Params, map_per_sample
from danceopd_jax.core.rollout import rollout_to
from danceopd_jax.core.routing import Slot
from danceopd_jax.core.schedule import add_noise, velocity_target


def velocity_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def routed_velocity(route_fields: Sequence[Field], route_params: Sequence[Params],
                    slots: Sequence[Slot], z: jax.Array, sigma: jax.Array, cond: Cond,
                    shards: int = 1) -> jax.Array:
    """Each route's field evaluated on its own slot only.

    The batch is `shards` blocks of equal size (one per data-parallel shard, see
    train/mesh.py); the slots tile each block in order, so route m's rows are rows
    [start, stop) of every block, and taking them never moves data between shards."""
    batch = z.shape[0]
    if batch % shards or batch // shards != slots[-1].stop:
        raise ValueError(f"slots {[(s.start, s.stop) for s in slots]} tile {slots[-1].stop} rows "
                         f"per shard, but the batch of {batch} is {shards} shard(s); build the "
                         "batch and the step with the same number of shards.")

    def take(x: jax.Array, s: Slot) -> jax.Array:
        x = x.reshape((shards, batch // shards) + x.shape[1:])[:, s.start:s.stop]
        return x.reshape((-1,) + x.shape[2:])

    parts = []
    for s in slots:
        part = map_per_sample(lambda x, s=s: take(x, s), cond)
        v = route_fields[s.route](route_params[s.route], take(z, s), take(sigma, s), part)
        parts.append(v.reshape((shards, s.stop - s.start) + v.shape[1:]))
    v = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return v.reshape((batch,) + v.shape[2:])


def danceopd_loss(student: Field, params: Params, route_fields: Sequence[Field],
                  route_params: Sequence[Params], slots: Sequence[Slot], z0: jax.Array,
                  cond: Cond, sigmas: jax.Array, query_idx: jax.Array,
                  shards: int = 1, full_rollout: bool = False) -> tuple[jax.Array, dict]:
    """On-policy distillation loss for one batch.

    z0: [B, ...] rollout noise; query_idx: [B, K] indices into the N-step schedule `sigmas`.
    Slots tile each of the batch's `shards` blocks (routed_velocity); the K queries of sample
    b sit at rows b*K .. b*K+K-1 afterwards, so each block stays contiguous.
    """
    batch, k = query_idx.shape
    z_query, forwards = rollout_to(student, params, z0, sigmas, cond, query_idx, full_rollout)
    z_query = z_query.reshape((batch * k,) + z0.shape[1:])
    sigma_query = sigmas[query_idx.reshape(-1)]
    cond_query = repeat_cond(cond, k)
    slots_query = [Slot(s.route, s.start * k, s.stop * k) for s in slots]
    target = jax.lax.stop_gradient(
        routed_velocity(route_fields, route_params, slots_query, z_query, sigma_query, cond_query,
                        shards))
    pred = student(params, z_query, sigma_query, cond_query)
    loss = velocity_mse(pred, target)
    return loss, {"rollout_forwards": forwards, "query_sigma": jnp.mean(sigma_query)}


def flow_matching_loss(field: Field, params: Params, x0: jax.Array, cond: Cond, eps: jax.Array,
                       sigma: jax.Array) -> tuple[jax.Array, dict]:
    """Plain (off-trajectory) flow matching on ground truth: trains the teachers and the anchor."""
    pred = field(params, add_noise(x0, eps, sigma), sigma, cond)
    return velocity_mse(pred, velocity_target(x0, eps)), {}


def repeat_cond(cond: Cond, k: int) -> Cond:
    """Repeat every per-sample condition K times (row b -> rows b*K .. b*K+K-1)."""
    return cond if k == 1 else map_per_sample(lambda x: jnp.repeat(x, k, axis=0), cond)

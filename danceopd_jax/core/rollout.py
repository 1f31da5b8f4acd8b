"""The student's on-policy rollouts, under stop-gradient.

The ODE rollout (DanceOPD, DiffusionOPD) stops at the query index. Cost matters here
(METHOD.md 2): reaching z_i takes exactly i student forwards. The loop runs to the largest index
queried in the batch and no further, and each of its steps moves only the samples still short of
their own last index: the rows are visited in the order of their last index (within each shard
block, so no row leaves its shard), and a step evaluates the field on the leading rows of every
block, as many as the most that are still moving, rounded up to a quarter of the block (one
compiled width per quarter). A row's forward does not depend on the other rows, so the states
are those of the whole batch stepping together (bit for bit for the shapes world's MMDiT on
XLA's CPU, to rounding for Z-Image: tests/test_backbones.py), at 4/5 of its forwards for the
default's 16 samples and Beta(5, 2) queries (12.0 of 14.8; docs/performance.md, round 8). The
SDE rollout (Flow-OPD) visits every state and records each transition's log-probability under
the policy that sampled it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from danceopd_jax.core.fields import Cond, Field, Params, map_per_sample
from danceopd_jax.core.schedule import euler_step, gaussian_log_prob, sde_transition


def _sigma_at(sigmas: jax.Array, i: jax.Array, batch: int) -> jax.Array:
    return jnp.full((batch,), sigmas[i], jnp.float32)


# How the ODE rollout steps the batch: "moving" only the rows short of their last index (in
# quarters of a shard block), "batch" every row up to the largest index, "full" every row for
# all N steps (the reference implementation's cost). The states are the same in all three.
ROLLOUTS = ("moving", "batch", "full")


def _widths(rows: int) -> tuple[int, ...]:
    """The compiled step widths of a block of `rows`: its quarters, rounded up."""
    return tuple(sorted({-(-rows * q // 4) for q in range(1, 5)}))


def rollout_to(field: Field, params: Params, z0: jax.Array, sigmas: jax.Array, cond: Cond,
               stop_at: jax.Array, rollout: str = "moving",
               shards: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """States z_{stop_at[b, k]} of the Euler rollout from z0, the loop's steps and its cost.

    z0: [B, ...] noise, `shards` equal blocks of rows (one per data-parallel shard); sigmas:
    [N+1]; stop_at: [B, K] int indices in [0, N-1]. Returns ([B, K, ...] states, the number of
    steps = max(stop_at), the field's rows evaluated over B = its forwards of the whole batch).
    `rollout` is one of ROLLOUTS; "batch" and "full" are kept to measure what the default saves.
    """
    if rollout not in ROLLOUTS:
        raise ValueError(f"rollout={rollout!r} is unknown; use one of {ROLLOUTS} "
                         "(--config.danceopd.rollout).")
    params = jax.lax.stop_gradient(params)
    z0 = jax.lax.stop_gradient(z0)
    batch, k = stop_at.shape
    rows = batch // shards

    def blocks(x: jax.Array) -> jax.Array:
        return x.reshape((shards, rows) + x.shape[1:])

    def rows_of(x: jax.Array, order: jax.Array) -> jax.Array:
        """x's rows in `order` ([shards, rows] indices within each block)."""
        x = blocks(x)
        take = order.reshape(order.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, take, axis=1).reshape((batch,) + x.shape[2:])

    def lead(x: jax.Array, width: int) -> jax.Array:
        return blocks(x)[:, :width].reshape((shards * width,) + x.shape[1:])

    # Rows ordered by their last index, largest first, so the moving rows lead every block.
    last = jnp.max(stop_at, axis=1)
    order = jnp.argsort(-blocks(last), axis=1, stable=True)
    last = blocks(rows_of(last, order))
    stop_at, z0 = rows_of(stop_at, order), rows_of(z0, order)
    cond = map_per_sample(lambda x: rows_of(x, order), cond)
    n = sigmas.shape[0] - 1
    steps = jnp.asarray(n, jnp.int32) if rollout == "full" else jnp.max(last)
    sizes = _widths(rows) if rollout == "moving" else (rows,)
    expand = (slice(None), slice(None)) + (None,) * (z0.ndim - 1)

    def advance(width: int):
        cond_w = map_per_sample(lambda x: lead(x, width), cond)

        def go(z: jax.Array, i: jax.Array) -> jax.Array:
            z_w = lead(z, width)
            v = field(params, z_w, _sigma_at(sigmas, i, shards * width), cond_w)
            z_w = euler_step(z_w, v, sigmas[i], sigmas[i + 1])
            z_w = z_w.reshape((shards, width) + z.shape[1:])
            return blocks(z).at[:, :width].set(z_w).reshape(z.shape)
        return go

    branches = [advance(w) for w in sizes]

    def record(i, z, states):
        hit = (stop_at == i)[expand]
        return jnp.where(hit, z[:, None], states)

    def body(carry):
        i, z, states, evaluated = carry
        states = record(i, z, states)
        b = jnp.searchsorted(jnp.asarray(sizes), jnp.max(jnp.sum(last > i, axis=1)))
        z = jax.lax.switch(b, branches, z, i) if len(sizes) > 1 else branches[0](z, i)
        return i + 1, z, states, evaluated + shards * jnp.asarray(sizes)[b]

    states = jnp.zeros((batch, k) + z0.shape[1:], z0.dtype)
    i, z, states, evaluated = jax.lax.while_loop(
        lambda c: c[0] < steps, body,
        (jnp.zeros((), jnp.int32), z0, states, jnp.zeros((), jnp.int32)))
    states = rows_of(record(i, z, states), jnp.argsort(order, axis=1))
    return jax.lax.stop_gradient(states), i, evaluated / batch


def sde_rollout(field: Field, params: Params, z0: jax.Array, sigmas: jax.Array, cond: Cond,
                noise: jax.Array, eta: float) -> tuple[jax.Array, jax.Array]:
    """The whole N-step SDE trajectory from z0 (schedule.sde_transition) and its log-probs.

    noise: [B, N, ...] standard normal draws, step i's in noise[:, i]. Returns
    ([B, N+1, ...] float32 states z_0 .. z_N, [B, N] float32 log-probabilities of each
    transition z_i -> z_{i+1} under the policy that sampled it).
    """
    params = jax.lax.stop_gradient(params)
    batch = z0.shape[0]

    def step(z, xs):
        i, xi = xs
        v = field(params, z, _sigma_at(sigmas, i, batch), cond)
        mean, std = sde_transition(z, v, sigmas[i], sigmas[i + 1], eta)
        z_next = mean + std * xi
        return z_next, (z_next, gaussian_log_prob(z_next, mean, std))

    z0 = z0.astype(jnp.float32)
    _, (states, log_probs) = jax.lax.scan(
        step, z0, (jnp.arange(sigmas.shape[0] - 1), jnp.moveaxis(noise, 1, 0)))
    states = jnp.concatenate([z0[None], states])
    return jax.lax.stop_gradient((jnp.moveaxis(states, 0, 1), log_probs.T))


def sample(field: Field, params: Params, z0: jax.Array, sigmas: jax.Array, cond: Cond) -> jax.Array:
    """Integrate the whole ODE from noise z0 to the clean endpoint (inference)."""
    batch = z0.shape[0]

    def step(z, i):
        v = field(params, z, _sigma_at(sigmas, i, batch), cond)
        return euler_step(z, v, sigmas[i], sigmas[i + 1]), None

    z, _ = jax.lax.scan(step, z0, jnp.arange(sigmas.shape[0] - 1))
    return z

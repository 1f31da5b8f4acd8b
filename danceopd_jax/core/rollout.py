"""The student's on-policy rollouts, under stop-gradient.

The ODE rollout (DanceOPD, DiffusionOPD) stops at the query index. Cost matters here
(METHOD.md 2): reaching z_i takes exactly i student forwards, so the loop runs to the largest
index queried in the batch and no further; samples whose own index is smaller simply keep their
recorded state. The SDE rollout (Flow-OPD) visits every state and records each transition's
log-probability under the policy that sampled it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from danceopd_jax.core.fields import Cond, Field, Params
from danceopd_jax.core.schedule import euler_step, gaussian_log_prob, sde_transition


def _sigma_at(sigmas: jax.Array, i: jax.Array, batch: int) -> jax.Array:
    return jnp.full((batch,), sigmas[i], jnp.float32)


def rollout_to(field: Field, params: Params, z0: jax.Array, sigmas: jax.Array, cond: Cond,
               stop_at: jax.Array, full: bool = False) -> tuple[jax.Array, jax.Array]:
    """States z_{stop_at[b, k]} of the Euler rollout from z0, and the number of forwards run.

    z0: [B, ...] noise; sigmas: [N+1]; stop_at: [B, K] int indices in [0, N-1].
    Returns ([B, K, ...] states, scalar count of field evaluations = max(stop_at)).
    full=True runs all N steps whatever the indices (the reference implementation's cost;
    same states, kept to measure what stopping early saves).
    """
    params = jax.lax.stop_gradient(params)
    z0 = jax.lax.stop_gradient(z0)
    batch, k = stop_at.shape
    last = jnp.asarray(sigmas.shape[0] - 1, jnp.int32) if full else jnp.max(stop_at)
    expand = (slice(None), slice(None)) + (None,) * (z0.ndim - 1)

    def record(i, z, states):
        hit = (stop_at == i)[expand]
        return jnp.where(hit, z[:, None], states)

    def body(carry):
        i, z, states = carry
        states = record(i, z, states)
        v = field(params, z, _sigma_at(sigmas, i, batch), cond)
        z = euler_step(z, v, sigmas[i], sigmas[i + 1])
        return i + 1, z, states

    states = jnp.zeros((batch, k) + z0.shape[1:], z0.dtype)
    i, z, states = jax.lax.while_loop(lambda c: c[0] < last, body,
                                      (jnp.zeros((), jnp.int32), z0, states))
    return jax.lax.stop_gradient(record(i, z, states)), i


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

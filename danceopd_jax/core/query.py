"""Which states of the student's own trajectory the teacher is asked about (METHOD.md 2.3).

Indices refer to the pre-step states z_0 .. z_{N-1} of an N-step rollout (z_0 = noise); the
clean endpoint is never queried. The default is one low-noise ("semantic-side") query:
i = floor(N * u), u ~ Beta(5, 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BETA_BIASES = {"low": (5.0, 2.0), "mid": (5.0, 5.0), "high": (2.0, 5.0), "uniform": (1.0, 1.0)}
QUERY_BIASES = (*BETA_BIASES, "stratified", "dense")


def validate_query(num_steps: int, k: int, bias: str) -> None:
    """Fail before compiling on a query setting that cannot work."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: the rollout needs at least 1 step.")
    if k < 1:
        raise ValueError(f"query K={k}: at least one query state per sample is needed (K >= 1).")
    if bias not in QUERY_BIASES:
        raise ValueError(f"query bias {bias!r} is unknown; use one of {QUERY_BIASES}.")
    if bias == "dense" and k != num_steps:
        raise ValueError(
            f"dense queries use every state, so K must equal num_steps (got K={k}, N={num_steps})."
        )


def sample_query(key: jax.Array, batch: int, num_steps: int, k: int = 1,
                 bias: str = "low", shared: bool = False) -> jax.Array:
    """[batch, k] int32 query indices in [0, num_steps - 1].

    shared=True draws one set of K indices per step for the whole batch. Each sample's query
    still has the bias's distribution, but the rollout, which must reach the batch's largest
    index, then stops at a typical index instead of near the maximum of B draws: the per-step
    cost of stopping early falls from about N forwards to about E[i] (the samples of one step
    are no longer queried independently)."""
    validate_query(num_steps, k, bias)
    if shared:
        return jnp.broadcast_to(sample_query(key, 1, num_steps, k, bias), (batch, k))
    if bias == "dense":
        return jnp.broadcast_to(jnp.arange(num_steps, dtype=jnp.int32), (batch, k))
    if bias == "stratified":
        # One draw per stratum [j/k, (j+1)/k) of the unit interval.
        u = (jnp.arange(k) + jax.random.uniform(key, (batch, k))) / k
    else:
        a, b = BETA_BIASES[bias]
        u = jax.random.beta(key, a, b, (batch, k))
    return jnp.clip(jnp.floor(num_steps * u), 0, num_steps - 1).astype(jnp.int32)

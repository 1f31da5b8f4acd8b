"""Which states of the student's own trajectory the teacher is asked about (METHOD.md 2.3).

Indices refer to the pre-step states z_0 .. z_{N-1} of an N-step rollout (z_0 = noise); the
clean endpoint is never queried. The default is one low-noise ("semantic-side") query:
i = floor(N * u), u ~ Beta(5, 2). K > 1 queries of a sample are K distinct states, as the
reference draws them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import betainc

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
    if bias in BETA_BIASES and k > num_steps:
        raise ValueError(f"query K={k} distinct states of an N={num_steps}-step rollout: K must "
                         f"be at most N; lower danceopd.query_k or use query_bias='dense'.")


def index_probs(num_steps: int, bias: str) -> np.ndarray:
    """[N] float64: P(floor(N u) = i) for u ~ the bias's Beta, the distribution of a single
    query index."""
    a, b = BETA_BIASES[bias]
    return np.diff(betainc(a, b, np.linspace(0.0, 1.0, num_steps + 1)))


def sample_query(key: jax.Array, batch: int, num_steps: int, k: int = 1,
                 bias: str = "low", shared: bool = False) -> jax.Array:
    """[batch, k] int32 query indices in [0, num_steps - 1].

    shared=True draws one set of K indices per step for the whole batch. Each sample's query
    still has the bias's distribution, but the rollout, which must reach the batch's largest
    index, then stops at a typical index instead of near the maximum of B draws: the per-step
    cost of stopping early falls from about N forwards to about E[i] (the samples of one step
    are no longer queried independently).

    K > 1 Beta-biased queries are K distinct indices drawn without replacement from the
    bias's index distribution (Gumbel-top-k: successive draws, each from the bias renormalised
    over the indices not yet drawn), so the first query of a sample has exactly the bias's
    distribution. K = 1 draws u ~ Beta itself (the same numbers as ever); stratified and dense
    queries are distinct by construction when N is a multiple of K."""
    validate_query(num_steps, k, bias)
    if shared:
        return jnp.broadcast_to(sample_query(key, 1, num_steps, k, bias), (batch, k))
    if bias == "dense":
        return jnp.broadcast_to(jnp.arange(num_steps, dtype=jnp.int32), (batch, k))
    if bias == "stratified":
        # One draw per stratum [j/k, (j+1)/k) of the unit interval.
        u = (jnp.arange(k) + jax.random.uniform(key, (batch, k))) / k
    elif k > 1:
        with np.errstate(divide="ignore"):  # an index of zero mass (huge N) is never drawn
            logits = jnp.asarray(np.log(index_probs(num_steps, bias)), jnp.float32)
        scores = logits + jax.random.gumbel(key, (batch, num_steps))
        return jax.lax.top_k(scores, k)[1].astype(jnp.int32)
    else:
        a, b = BETA_BIASES[bias]
        u = jax.random.beta(key, a, b, (batch, k))
    return jnp.clip(jnp.floor(num_steps * u), 0, num_steps - 1).astype(jnp.int32)

"""Flow-matching conventions (SD3 / diffusers): sigma=1 is noise, sigma=0 is data.

x_sigma = (1 - sigma) * x0 + sigma * eps,  v = eps - x0,
Euler: z_{i+1} = z_i + (sigma_{i+1} - sigma_i) * v(z_i, sigma_i).
Latents and sigmas stay float32 everywhere (bf16 is only for matmuls inside backbones).

The SDE transition (Flow-OPD, METHOD.md 7) is the stochastic sampler with the same marginals
as the ODE: with the flow-matching score -(z + (1 - sigma) v) / sigma and the diffusion
coefficient g(sigma) = eta * sqrt(sigma / (1 - sigma)),
  z_{i+1} ~ N(z_i + dsigma * (v + g^2 / (2 sigma) * (z_i + (1 - sigma) v)), g^2 |dsigma| I),
dsigma = sigma_{i+1} - sigma_i < 0 (Flow-GRPO's SD3 SDE). At sigma = 1, g would be infinite:
it uses sigma_{i+1} in the denominator instead, as Flow-GRPO and the DanceOPD reference do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SCHEDULE_VARIANTS = ("clean", "diffusers")


def shift_sigmas(s: jax.Array, shift: float) -> jax.Array:
    """SD3's resolution shift: k*s / (1 + (k-1)*s). shift=1 is the identity."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def make_sigmas(num_steps: int, shift: float = 1.0, variant: str = "clean") -> jax.Array:
    """The N+1 noise levels of an N-step sampler, from 1 down to 0 (float32).

    "clean" shifts linspace(1, 0, N+1). "diffusers" mirrors FlowMatchEulerDiscreteScheduler
    (linspace(1, 1/1000, N), shifted, then a final 0) for parity with PyTorch pipelines.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: a sampler needs at least 1 step.")
    if shift <= 0:
        raise ValueError(f"shift={shift}: the schedule shift must be > 0 (1.0 = no shift).")
    if variant == "clean":
        s = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)
        return shift_sigmas(s, shift)
    if variant == "diffusers":
        s = shift_sigmas(jnp.linspace(1.0, 1.0 / 1000.0, num_steps, dtype=jnp.float32), shift)
        return jnp.concatenate([s, jnp.zeros((1,), jnp.float32)])
    raise ValueError(f"schedule variant {variant!r} is unknown; use one of {SCHEDULE_VARIANTS}.")


def _per_sample(sigma: jax.Array, like: jax.Array) -> jax.Array:
    """Broadcast a per-sample [B] (or scalar) sigma against a [B, ...] array."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return sigma.reshape(sigma.shape + (1,) * (like.ndim - sigma.ndim))


def add_noise(x0: jax.Array, eps: jax.Array, sigma: jax.Array) -> jax.Array:
    s = _per_sample(sigma, x0)
    return (1.0 - s) * x0 + s * eps


def velocity_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
    return eps - x0


def euler_step(z: jax.Array, v: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    return z + _per_sample(sigma_next - sigma, z) * v


def sde_transition(z: jax.Array, v: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
                   eta: float) -> tuple[jax.Array, jax.Array]:
    """Mean [B, ...] and standard deviation [B, 1, ...] of the SDE step z -> z_next, in float32.

    sigma, sigma_next: per-sample [B] (or scalars) with sigma_next < sigma."""
    z, v = z.astype(jnp.float32), v.astype(jnp.float32)
    s, s_next = _per_sample(sigma, z), _per_sample(sigma_next, z)
    dsigma = s_next - s
    g2 = eta ** 2 * s / (1.0 - jnp.where(s >= 1.0, s_next, s))
    mean = z + dsigma * (v + g2 / (2.0 * s) * (z + (1.0 - s) * v))
    return mean, jnp.sqrt(g2 * -dsigma)


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """[B] log N(x; mean, std^2 I) per element, averaged over each sample's elements (float32,
    the Flow-GRPO normalisation, so the value does not grow with the latent size)."""
    x, mean = x.astype(jnp.float32), mean.astype(jnp.float32)
    log_p = (-jnp.square(x - mean) / (2.0 * jnp.square(std)) - jnp.log(std)
             - 0.5 * math.log(2.0 * math.pi))
    return jnp.mean(log_p.reshape(log_p.shape[0], -1), axis=1)

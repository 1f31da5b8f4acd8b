"""Flow-matching conventions (SD3 / diffusers): sigma=1 is noise, sigma=0 is data.

x_sigma = (1 - sigma) * x0 + sigma * eps,  v = eps - x0,
Euler: z_{i+1} = z_i + (sigma_{i+1} - sigma_i) * v(z_i, sigma_i).
Latents and sigmas stay float32 everywhere (bf16 is only for matmuls inside backbones).
"""

from __future__ import annotations

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

"""Compile time of the student's forward+backward with and without scanned layers, at
SD3.5-Medium's block structure (24 blocks: 13 dual-attention, 10 plain, the last one) and a
tiny width, so only the compiler's work differs:

    python benchmarks/scan_compile.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from danceopd_jax.models.mmdit import MMDiT, sd35_medium_config


def compile_seconds(scan_layers: bool) -> float:
    config = sd35_medium_config(
        num_attention_heads=2, attention_head_dim=16, caption_projection_dim=32,
        joint_attention_dim=32, pooled_projection_dim=16, sample_size=16, pos_embed_max_size=16,
        in_channels=4, out_channels=4, remat="block", scan_layers=scan_layers)
    graph, params = nnx.split(MMDiT(config, rngs=nnx.Rngs(0)))
    z = jnp.zeros((2, 16, 16, 4))
    cond = {"text": jnp.zeros((2, 5, 32)), "text_mask": jnp.ones((2, 5), bool),
            "pooled": jnp.ones((2, 16)), "source": z, "has_source": jnp.ones(2, bool)}

    def loss(p: nnx.State) -> jax.Array:
        return jnp.mean(nnx.merge(graph, p)(z, jnp.full((2,), 0.5), cond) ** 2)

    t0 = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(params).compile()
    return time.perf_counter() - t0


if __name__ == "__main__":
    print(f"device: {jax.devices()[0].device_kind}")
    unrolled, scanned = compile_seconds(False), compile_seconds(True)
    print(f"24 blocks, forward+backward with remat: unrolled {unrolled:.1f} s, scanned "
          f"{scanned:.1f} s to compile ({unrolled / scanned:.1f}x)")

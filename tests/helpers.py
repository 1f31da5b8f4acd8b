"""Helpers shared by several test modules (fixtures stay in conftest.py).

The SD3 parity helpers import torch and diffusers lazily, so importing this module costs
nothing to a test that does not use them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.models.mmdit import MMDiT, MMDiTConfig

# Weights ~ N(0, STD), norm weights ~ 1 + N(0, STD): no layer is zero or identity. Much larger
# weights amplify float32 rounding of the sin/cos time features (timestep up to 1000) past TOL.
STD = 0.2
TOL = 1e-4
B, L, H, W = 2, 5, 8, 6  # W < sample_size: exercises the centre crop of the position table
SD3 = {
    "sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 3,
    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 12,
    "caption_projection_dim": 16, "pooled_projection_dim": 10, "pos_embed_max_size": 6,
}
# MMDiT-X: dual attention in the first block and in the last (context_pre_only) one.
SD35 = {**SD3, "dual_attention_layers": (0, 2), "qk_norm": "rms_norm"}


def random_like(name: str, shape: tuple[int, ...], rng: np.random.Generator,
                std: float = STD) -> np.ndarray:
    noise = std * rng.standard_normal(shape).astype(np.float32)
    is_norm_weight = len(shape) == 1 and name.endswith(("weight", "scale"))
    return 1 + noise if is_norm_weight else noise


def randomize(model: Any, seed: int = 0, std: float = STD) -> Any:
    """Every parameter of a torch module randomised (random_like: 1-D weights around 1, as a
    norm's scale), so that parity covers every weight: default inits (zero biases, unit norm
    weights) would hide dropped or swapped keys. Returns the module in eval mode."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(random_like(name, tuple(p.shape), rng, std)))
    return model.eval()


def with_params(factory: Callable[[], nnx.Module], params: dict) -> nnx.Module:
    """Build abstractly (no init ops to run), then fill in the converted params."""
    graph, state = nnx.split(nnx.eval_shape(factory))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graph, state)


def torch_sd3(kwargs: dict, seed: int = 0) -> Any:
    """A diffusers SD3Transformer2DModel with every parameter randomised."""
    from diffusers import SD3Transformer2DModel

    return randomize(SD3Transformer2DModel(**kwargs), seed)


def sd3_inputs(config: MMDiTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "z": rng.standard_normal((B, H, W, config.in_channels), np.float32),
        "sigma": rng.uniform(0, 1, B).astype(np.float32),
        "text": rng.standard_normal((B, L, config.joint_attention_dim), np.float32),
        "pooled": rng.standard_normal((B, config.pooled_projection_dim), np.float32),
    }


def torch_sd3_forward(model: Any, x: dict[str, np.ndarray]) -> np.ndarray:
    """diffusers' forward on our inputs: NCHW, timestep = 1000 * sigma; back to NHWC."""
    import torch

    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x["z"].transpose(0, 3, 1, 2).copy()),
            encoder_hidden_states=torch.from_numpy(x["text"]),
            pooled_projections=torch.from_numpy(x["pooled"]),
            timestep=torch.from_numpy(1000 * x["sigma"]),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef: nnx.GraphDef, state: nnx.State, x: dict[str, jax.Array]) -> jax.Array:
    cond = {"text": x["text"], "text_mask": jnp.ones(x["text"].shape[:2], bool),
            "pooled": x["pooled"]}
    return nnx.merge(graphdef, state)(x["z"], x["sigma"], cond)


def mmdit_forward(config: MMDiTConfig, params: dict, x: dict[str, np.ndarray]) -> np.ndarray:
    """Our MMDiT with the given params on sd3_inputs-style inputs."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return np.asarray(_apply(graphdef, state, x))


def max_err(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())

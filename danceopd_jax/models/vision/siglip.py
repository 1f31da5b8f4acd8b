"""SigLIP2 vision tower (transformers ``Siglip2VisionModel``, Z-Image omni's image encoder) in
Flax NNX, up to ``last_hidden_state`` (the attention-pooling head is not built).

Module names follow transformers with the ``vision_model.`` prefix dropped:
``embeddings.{patch_embedding (Linear over flattened patches), position_embedding (a
grid x grid table)}``, ``encoder.layers[i].{layer_norm1, self_attn.{q,k,v,out}_proj,
layer_norm2, mlp.fc1, mlp.fc2}`` and ``post_layernorm``.

NaFlex inputs, as ``Siglip2ImageProcessor`` makes them: ``pixel_values`` [B, N, p * p * C]
(patches in row-major order, padded to N), ``pixel_attention_mask`` [B, N] and the patch grid
``(h, w)``; the learned position table is resized to (h, w) with transformers' antialiased
bilinear weights (``resize_positional_embeddings``). Here one batch shares one grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# transformers' ACT2FN names: "gelu_pytorch_tanh" is the tanh approximation (SigLIP's).
_ACTIVATIONS = {
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu": partial(jax.nn.gelu, approximate=False),
}


@dataclass(frozen=True)
class SiglipVisionConfig:
    """Names follow transformers' ``Siglip2VisionConfig`` (defaults: so400m-patch16-naflex)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    num_patches: int = 256
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by "
                             f"num_attention_heads={self.num_attention_heads}.")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is unsupported; use "
                             f"{tuple(_ACTIVATIONS)}.")
        if round(self.num_patches ** 0.5) ** 2 != self.num_patches:
            raise ValueError(f"num_patches={self.num_patches} must be a square (the position "
                             "table is a square grid).")


def position_weights(grid: int, shape: tuple[int, int], length: int) -> np.ndarray:
    """[length, grid * grid] float32: row i mixes the grid x grid position table into patch i of
    an (h, w) patch grid (rows past h * w take position (0, 0)), as transformers'
    ``Siglip2VisionEmbeddings.resize_positional_embeddings``: separable bilinear weights whose
    support widens when shrinking (antialiasing)."""
    h, w = shape
    if h < 1 or w < 1 or h * w > length:
        raise ValueError(f"patch grid {shape} does not fit {length} patches; pass the "
                         "processor's spatial_shapes and its max_num_patches.")
    sizes = np.array([h, w], np.float32)
    positions = np.arange(length, dtype=np.float32)[:, None]
    rows = np.floor(positions / sizes[1])
    index = np.concatenate([rows, positions - rows * sizes[1]], axis=-1)
    index = index * (positions < h * w)
    scale = np.float32(grid) / sizes
    support = np.maximum(scale, 1)
    center = (index + 0.5) * scale - 0.5
    source = np.arange(grid, dtype=np.float32)
    weights = np.maximum(1 - np.abs(source - center[..., None]) / support[:, None], 0)
    weights = weights / weights.sum(-1, keepdims=True)
    return (weights[:, 0, :, None] * weights[:, 1, None, :]).reshape(length, -1)


def _dense(cfg: SiglipVisionConfig, rngs: nnx.Rngs, n_in: int, n_out: int,
           axes: tuple[str | None, str | None]) -> nnx.Linear:
    # Logical axis names as in the MMDiT; the trainer maps them to mesh axes.
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), axes, eager_sharding=False)
    return nnx.Linear(n_in, n_out, dtype=jnp.dtype(cfg.dtype), kernel_init=init, rngs=rngs)


def _norm(cfg: SiglipVisionConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                         rngs=rngs)


class SiglipEmbeddings(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        patch = cfg.num_channels * cfg.patch_size ** 2
        self.patch_embedding = _dense(cfg, rngs, patch, cfg.hidden_size, (None, "embed"))
        self.position_embedding = nnx.Embed(cfg.num_patches, cfg.hidden_size, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, shape: tuple[int, int]) -> jax.Array:
        grid = round(self.cfg.num_patches ** 0.5)
        weights = jnp.asarray(position_weights(grid, shape, pixel_values.shape[1]))
        positions = weights @ self.position_embedding.embedding[...].astype(jnp.float32)
        return self.patch_embedding(pixel_values).astype(jnp.float32) + positions[None]


class SiglipAttention(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        d, self.heads = cfg.hidden_size, cfg.num_attention_heads
        dense = partial(_dense, cfg, rngs, d, d)
        self.q_proj, self.k_proj, self.v_proj = (dense(("embed", "heads")) for _ in range(3))
        self.out_proj = dense(("heads", "embed"))

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, n, d = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return self.out_proj(out.reshape(b, n, d)).astype(jnp.float32)


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = _dense(cfg, rngs, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
        self.fc2 = _dense(cfg, rngs, cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x))).astype(jnp.float32)


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = _norm(cfg, rngs)
        self.self_attn = SiglipAttention(cfg, rngs=rngs)
        self.layer_norm2 = _norm(cfg, rngs)
        self.mlp = SiglipMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([SiglipEncoderLayer(cfg, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class SiglipVisionModel(nnx.Module):
    """``(pixel_values [B, N, p * p * C], pixel_attention_mask [B, N] bool, shape=(h, w)) ->
    last_hidden_state [B, N, hidden_size]`` (post-LayerNorm'd); padded patches are never
    attended to. Z-Image keeps the first h * w rows, as an (h, w) grid."""

    def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = SiglipEmbeddings(config, rngs=rngs)
        self.encoder = SiglipEncoder(config, rngs=rngs)
        self.post_layernorm = _norm(config, rngs)

    def __call__(self, pixel_values: jax.Array, pixel_attention_mask: jax.Array,
                 shape: tuple[int, int]) -> jax.Array:
        width = self.config.num_channels * self.config.patch_size ** 2
        if pixel_values.ndim != 3 or pixel_values.shape[-1] != width:
            raise ValueError(f"pixel_values of shape {pixel_values.shape}: expected [B, N, "
                             f"{width}] (flattened {self.config.patch_size}-pixel patches).")
        mask = pixel_attention_mask.astype(bool)[:, None, None, :]
        x = self.embeddings(pixel_values.astype(jnp.float32), shape)
        return self.post_layernorm(self.encoder(x, mask))

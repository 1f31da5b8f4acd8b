"""Qwen3 text model (transformers ``Qwen3Model``, Z-Image's text encoder) in Flax NNX.

Module names follow transformers: ``embed_tokens`` (Embedding ``weight`` <-> ``embedding``),
``layers[i].{self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, mlp.{gate,up,down}_proj,
input_layernorm, post_attention_layernorm}`` and ``norm`` (RMSNorm ``weight`` <-> ``scale``);
Linear ``kernel`` is the transposed ``weight``.

Qwen3 specifics: a causal decoder with pre-RMSNorm residual blocks, grouped-query attention
(``num_key_value_heads`` shared K/V heads), RMSNorm on each query and key head before the
rotary embedding (rotate-half form, positions ``0..L-1`` whatever the padding), and a SwiGLU
MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclass(frozen=True)
class Qwen3Config:
    """Names follow transformers' ``Qwen3Config``; defaults are Qwen3-4B (Z-Image's encoder)."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention).")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (rotary embedding).")


def rotary(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """transformers' default RoPE: (cos, sin) [L, head_dim], frequencies repeated twice."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    freqs = positions[:, None].astype(np.float32) * inv_freq.astype(np.float32)[None]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, H, D] rotated by (cos, sin) [L, D]: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _dense(cfg: Qwen3Config, rngs: nnx.Rngs, n_in: int, n_out: int,
           axes: tuple[str | None, str | None], bias: bool = False) -> nnx.Linear:
    # Logical axis names as in the MMDiT; the trainer maps them to mesh axes.
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), axes, eager_sharding=False)
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=jnp.dtype(cfg.dtype), kernel_init=init,
                      rngs=rngs)


def _rms(cfg: Qwen3Config, rngs: nnx.Rngs, features: int) -> nnx.RMSNorm:
    return nnx.RMSNorm(features, epsilon=cfg.rms_norm_eps, dtype=jnp.float32, rngs=rngs)


class Qwen3Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dense = partial(_dense, cfg, rngs, bias=cfg.attention_bias)
        d, q_width = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        kv_width = cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = dense(d, q_width, ("embed", "heads"))
        self.k_proj = dense(d, kv_width, ("embed", "heads"))
        self.v_proj = dense(d, kv_width, ("embed", "heads"))
        self.o_proj = dense(q_width, d, ("heads", "embed"))
        self.q_norm = _rms(cfg, rngs, cfg.head_dim)
        self.k_norm = _rms(cfg, rngs, cfg.head_dim)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
                 mask: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        heads = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads)
        q = self.q_norm(self.q_proj(x).reshape(b, n, heads[0], -1))
        k = self.k_norm(self.k_proj(x).reshape(b, n, heads[1], -1))
        v = self.v_proj(x).reshape(b, n, heads[1], -1)
        q, k = (_rotate(t, *rope).astype(v.dtype) for t in (q, k))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # K/V heads shared by groups
        return self.o_proj(out.reshape(b, n, -1)).astype(jnp.float32)


class Qwen3MLP(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        dense = partial(_dense, cfg, rngs)
        self.gate_proj = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
        self.up_proj = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
        self.down_proj = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)).astype(
            jnp.float32)


class Qwen3DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        self.self_attn = Qwen3Attention(cfg, rngs=rngs)
        self.mlp = Qwen3MLP(cfg, rngs=rngs)
        self.input_layernorm = _rms(cfg, rngs, cfg.hidden_size)
        self.post_attention_layernorm = _rms(cfg, rngs, cfg.hidden_size)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
                 mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nnx.Module):
    """``(input_ids [B, L] int32, attention_mask [B, L] bool) -> hidden [B, L, hidden_size]``.

    The default is transformers' ``last_hidden_state`` (final RMSNorm); with
    ``output_hidden_layer=i``, its ``hidden_states[i]`` (0: the embeddings, k: layer k's
    output, negative from the end, no final norm), computing only the layers it needs: -2
    (Z-Image's features) skips the last layer. Masked (False) tokens are never attended to
    but still get outputs; every row needs at least one True.
    """

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"),
                                     eager_sharding=False)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size,
                                      embedding_init=init, rngs=rngs)
        self.layers = nnx.List([Qwen3DecoderLayer(config, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = _rms(config, rngs, config.hidden_size)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                 output_hidden_layer: int | None = None) -> jax.Array:
        b, n = input_ids.shape
        depth = self.config.num_hidden_layers
        if output_hidden_layer is not None and not -depth - 1 <= output_hidden_layer <= depth:
            raise ValueError(
                f"output_hidden_layer={output_hidden_layer} is outside [{-depth - 1}, {depth}] "
                f"(hidden_states of {depth} layers); use e.g. -2 as Z-Image does.")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                             f"{input_ids.shape}; pass one bool per token.")
        stop = depth if output_hidden_layer is None else output_hidden_layer % (depth + 1)
        cos, sin = rotary(np.arange(n), self.config.head_dim, self.config.rope_theta)
        rope = (jnp.asarray(cos), jnp.asarray(sin))
        causal = jnp.tril(jnp.ones((n, n), bool))
        mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
        x = self.embed_tokens(input_ids).astype(jnp.float32)
        for layer in self.layers[:stop]:
            x = layer(x, rope, mask)
        return self.norm(x) if output_hidden_layer is None else x

"""T5 encoder (transformers ``T5EncoderModel``, e.g. SD3's T5 v1.1 XXL) in Flax NNX.

Module names follow transformers: ``shared`` (the token embedding), ``encoder.block[i].layer[0]``
(``SelfAttention.{q,k,v,o}``, ``layer_norm``; block 0 alone holds
``SelfAttention.relative_attention_bias``, which every block reuses), ``encoder.block[i].layer[1]``
(``DenseReluDense.{wi_0,wi_1,wo}`` when gated, ``{wi,wo}`` otherwise, ``layer_norm``) and
``encoder.final_layer_norm``. Embedding ``weight`` <-> ``embedding``, norm ``weight`` <->
``scale``; Linear ``kernel`` is the transposed ``weight``, and T5 has no biases.

T5 specifics: RMS layer norm (no mean subtraction, no bias), unscaled attention logits plus a
learned bucketed relative-position bias, a pre-norm residual stream, no position embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# transformers' ACT2FN names: "gelu" is the exact erf form, "gelu_new" the tanh approximation.
_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


@dataclass(frozen=True)
class T5Config:
    """Names and defaults follow transformers' ``T5Config`` (t5-small, encoder fields only).

    ``feed_forward_proj`` is ``"<act>"`` (``T5DenseActDense``) or ``"gated-<act>"``
    (``T5DenseGatedActDense``); ``"gated-gelu"`` (T5 v1.1, SD3's T5-XXL) means ``gelu_new``.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        *gate, act = self.feed_forward_proj.split("-")
        if gate not in ([], ["gated"]) or act not in _ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is unsupported; use '<act>' or "
                f"'gated-<act>' with <act> in {tuple(_ACTIVATIONS)}."
            )
        if self.relative_attention_num_buckets < 4:
            raise ValueError(
                f"relative_attention_num_buckets={self.relative_attention_num_buckets} is too "
                "small; the bidirectional bucketing needs at least 4."
            )

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        """The activation's transformers name (as transformers derives it)."""
        act = self.feed_forward_proj.rpartition("-")[2]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act


def relative_position_bucket(
    relative_position: np.ndarray, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Bidirectional T5 buckets of ``key_pos - query_pos`` (transformers'
    ``T5Attention._relative_position_bucket``).

    Half the buckets are for positive offsets; within a half, offsets below ``num_buckets // 4``
    get their own bucket and larger ones share log-spaced buckets up to ``max_distance``. The
    log is taken in float32, as torch does, so that offsets on a bucket edge land alike.
    """
    half = num_buckets // 2
    max_exact = half // 2
    rel = np.asarray(relative_position, np.int64)
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    far = np.maximum(dist, max_exact).astype(np.float32)  # the log branch serves dist >= max_exact
    scaled = (
        np.log(far / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(half - max_exact)
    )
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return buckets + np.where(dist < max_exact, dist, large)


def _linear(
    in_features: int, out_features: int, axes: tuple[str | None, str | None], cfg: T5Config,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    # Logical axis names as in the MMDiT; the trainer maps them to mesh axes.
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), axes, eager_sharding=False)
    return nnx.Linear(
        in_features, out_features, use_bias=False, dtype=jnp.dtype(cfg.dtype), kernel_init=init,
        rngs=rngs,
    )


def _embed(num: int, features: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs):
    init = nnx.with_partitioning(nnx.initializers.variance_scaling(1.0, "fan_in", "normal",
                                                                   out_axis=0),
                                 axes, eager_sharding=False)  # nnx.Embed's default init
    return nnx.Embed(num, features, embedding_init=init, rngs=rngs)


def _layer_norm(cfg: T5Config, rngs: nnx.Rngs) -> nnx.RMSNorm:
    # T5LayerNorm: x * rsqrt(mean(x^2) + eps) * weight, computed in float32.
    return nnx.RMSNorm(cfg.d_model, epsilon=cfg.layer_norm_epsilon, dtype=jnp.float32, rngs=rngs)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, rngs: nnx.Rngs):
        self.cfg = cfg
        inner = cfg.num_heads * cfg.d_kv
        self.q = _linear(cfg.d_model, inner, ("embed", "heads"), cfg, rngs)
        self.k = _linear(cfg.d_model, inner, ("embed", "heads"), cfg, rngs)
        self.v = _linear(cfg.d_model, inner, ("embed", "heads"), cfg, rngs)
        self.o = _linear(inner, cfg.d_model, ("heads", "embed"), cfg, rngs)
        if has_relative_attention_bias:
            self.relative_attention_bias = _embed(
                cfg.relative_attention_num_buckets, cfg.num_heads, (None, "heads"), rngs
            )

    def compute_bias(self, length: int) -> jax.Array:
        """Relative-position bias [1, heads, L, L] (only the first block has the table)."""
        positions = np.arange(length)
        buckets = relative_position_bucket(
            positions[None, :] - positions[:, None],
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        )
        return self.relative_attention_bias(jnp.asarray(buckets)).transpose(2, 0, 1)[None]

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        q, k, v = (p(x).reshape(b, n, self.cfg.num_heads, -1) for p in (self.q, self.k, self.v))
        # T5 folds the 1/sqrt(d_kv) scale into its init: logits are unscaled.
        out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), mask=mask, scale=1.0)
        return self.o(out.reshape(b, n, -1)).astype(jnp.float32)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias, rngs=rngs)
        self.layer_norm = _layer_norm(cfg, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
        return x + self.SelfAttention(self.layer_norm(x), bias, mask)


class T5DenseActDense(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.act = _ACTIVATIONS[cfg.dense_act_fn]
        self.wi = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs)
        self.wo = _linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(self.act(self.wi(x))).astype(jnp.float32)


class T5DenseGatedActDense(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.act = _ACTIVATIONS[cfg.dense_act_fn]
        self.wi_0 = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs)
        self.wi_1 = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs)
        self.wo = _linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x)).astype(jnp.float32)


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        dense = T5DenseGatedActDense if cfg.is_gated_act else T5DenseActDense
        self.DenseReluDense = dense(cfg, rngs=rngs)  # transformers' name, whatever the act
        self.layer_norm = _layer_norm(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, rngs: nnx.Rngs):
        self.layer = nnx.List([
            T5LayerSelfAttention(cfg, has_relative_attention_bias, rngs=rngs),
            T5LayerFF(cfg, rngs=rngs),
        ])

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
        return self.layer[1](self.layer[0](x, bias, mask))


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.block = nnx.List(
            [T5Block(cfg, i == 0, rngs=rngs) for i in range(cfg.num_layers)]
        )
        self.final_layer_norm = _layer_norm(cfg, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        bias = self.block[0].layer[0].SelfAttention.compute_bias(x.shape[1])
        for block in self.block:
            x = block(x, bias, mask)
        return self.final_layer_norm(x)


class T5Encoder(nnx.Module):
    """``(input_ids [B, L] int32, attention_mask [B, L] bool) -> last_hidden_state
    [B, L, d_model] float32``.

    Masked (False) tokens are never attended to, but still get outputs (as in transformers);
    every row needs at least one True. SD3 passes no mask (all True) and keeps every position.
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = _embed(config.vocab_size, config.d_model, ("vocab", "embed"), rngs)
        self.encoder = T5Stack(config, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} != input_ids shape "
                f"{input_ids.shape}; pass one bool per token."
            )
        mask = attention_mask.astype(bool)[:, None, None, :]
        return self.encoder(self.shared(input_ids), mask)

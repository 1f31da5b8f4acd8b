"""CLIP text encoder (transformers ``CLIPTextModelWithProjection``) in Flax NNX.

Module names follow transformers with the ``text_model.`` prefix dropped:
``embeddings.{token,position}_embedding`` (``embedding`` <-> ``weight``),
``encoder.layers[i].{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2,
layer_norm2}``, ``final_layer_norm`` (``scale`` <-> ``weight``) and
``text_projection`` (no bias); Linear ``kernel`` is the transposed ``weight``.

Legacy CLIP configs say ``eos_token_id=2`` and transformers then pools at the
highest token id; set ``eos_token_id`` to the tokenizer's real EOS id (49407
for OpenAI CLIP) instead, which selects the same position.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Names and defaults follow transformers' ``CLIPTextConfig`` (ViT-L/14 text tower)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    dtype: str = "float32"
    # Ours, not transformers' (whose CLIP text tower is always causal: a token never sees the
    # words after it). False lets every token attend to the whole prompt, as T5's encoder does
    # (the shapes world's model.text_bidirectional; docs/teachers.md, "What the base's T2I
    # misses"). Checkpoints converted from transformers keep the default.
    causal: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is unsupported; use {_ACTIVATIONS}.")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(
                f"eos_token_id={self.eos_token_id} is outside the vocabulary "
                f"[0, {self.vocab_size}); use the tokenizer's EOS id."
            )


def tiny_text_config(
    vocab_size: int,
    max_len: int = 24,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    projection_dim: int = 64,
    eos_token_id: int | None = None,
    causal: bool = True,
) -> CLIPTextConfig:
    """A small CLIP text tower for the toy world; EOS defaults to the last id (CLIP convention)."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_len,
        projection_dim=projection_dim,
        eos_token_id=vocab_size - 1 if eos_token_id is None else eos_token_id,
        causal=causal,
    )


def _linear(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    cfg: CLIPTextConfig,
    rngs: nnx.Rngs,
    *,
    bias: bool = True,
) -> nnx.Linear:
    # Logical axis names as in the MMDiT; the trainer maps them to mesh axes.
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), axes, eager_sharding=False)
    return nnx.Linear(
        in_features, out_features, use_bias=bias, dtype=jnp.dtype(cfg.dtype), kernel_init=init,
        rngs=rngs,
    )


def _embed(num: int, cfg: CLIPTextConfig, axes: tuple[str | None, str], rngs: nnx.Rngs):
    init = nnx.with_partitioning(nnx.initializers.variance_scaling(1.0, "fan_in", "normal",
                                                                   out_axis=0),
                                 axes, eager_sharding=False)  # nnx.Embed's default init
    return nnx.Embed(num, cfg.hidden_size, embedding_init=init, rngs=rngs)


def _layer_norm(cfg: CLIPTextConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32, rngs=rngs)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.token_embedding = _embed(cfg.vocab_size, cfg, ("vocab", "embed"), rngs)
        self.position_embedding = _embed(cfg.max_position_embeddings, cfg, (None, "embed"), rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj = _linear(d, d, ("embed", "heads"), cfg, rngs)
        self.k_proj = _linear(d, d, ("embed", "heads"), cfg, rngs)
        self.v_proj = _linear(d, d, ("embed", "heads"), cfg, rngs)
        self.out_proj = _linear(d, d, ("heads", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, n, d = x.shape
        q, k, v = (
            p(x).reshape(b, n, self.heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return self.out_proj(out.reshape(b, n, d)).astype(jnp.float32)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = _linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), cfg, rngs)
        self.fc2 = _linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc1(x)
        # transformers' "gelu" is the exact erf form; "quick_gelu" is x * sigmoid(1.702 x).
        h = h * jax.nn.sigmoid(1.702 * h) if self.quick else jax.nn.gelu(h, approximate=False)
        return self.fc2(h).astype(jnp.float32)


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(cfg, rngs=rngs)
        self.layer_norm1 = _layer_norm(cfg, rngs)
        self.mlp = CLIPMLP(cfg, rngs=rngs)
        self.layer_norm2 = _layer_norm(cfg, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [CLIPEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )

    def __call__(self, x: jax.Array, mask: jax.Array) -> list[jax.Array]:
        """transformers' ``hidden_states``: the embeddings, then every layer's output."""
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], mask))
        return states


class CLIPTextEncoder(nnx.Module):
    """``(input_ids [B, L] int32, attention_mask [B, L] bool) -> (tokens, pooled)``.

    ``tokens`` [B, L, hidden] is the final-LayerNorm'd last hidden state, or with
    ``output_hidden_layer=i`` transformers' ``hidden_states[i]`` (0: the embeddings, k: layer
    k's output, negative from the end; no final LayerNorm), e.g. -2 for SD3's penultimate
    layer. ``pooled`` [B, projection_dim] always projects the final-LayerNorm'd last hidden
    state at the first ``eos_token_id`` (the last real token when a row has no EOS).
    """

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, rngs=rngs)
        self.encoder = CLIPEncoder(config, rngs=rngs)
        self.final_layer_norm = _layer_norm(config, rngs)
        self.text_projection = _linear(
            config.hidden_size, config.projection_dim, ("embed", None), config, rngs, bias=False
        )

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, *,
        output_hidden_layer: int | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        b, n = input_ids.shape
        depth = self.config.num_hidden_layers
        if output_hidden_layer is not None and not -depth - 1 <= output_hidden_layer <= depth:
            raise ValueError(
                f"output_hidden_layer={output_hidden_layer} is outside [{-depth - 1}, {depth}] "
                f"(hidden_states of {depth} layers); use e.g. -2 for the penultimate layer."
            )
        if n > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids length {n} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}; truncate the tokens."
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} != input_ids shape "
                f"{input_ids.shape}; pass one bool per token."
            )
        keys = attention_mask.astype(bool)
        mask = keys[:, None, None, :]
        if self.config.causal:
            mask = jnp.tril(jnp.ones((n, n), bool))[None, None] & mask
        states = self.encoder(self.embeddings(input_ids), mask)
        hidden = self.final_layer_norm(states[-1])

        is_eos = input_ids == self.config.eos_token_id
        last_real = jnp.maximum(keys.sum(-1) - 1, 0)
        pos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1), last_real)
        pooled = hidden[jnp.arange(b), pos]
        tokens = hidden if output_hidden_layer is None else states[output_hidden_layer]
        return tokens, self.text_projection(pooled).astype(jnp.float32)

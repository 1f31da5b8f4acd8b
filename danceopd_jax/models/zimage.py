"""Z-Image's single-stream DiT (S3-DiT) in Flax NNX, called as our velocity model.

Module and parameter names mirror diffusers' ``ZImageTransformer2DModel`` (0.42.1), so that
interop/diffusers_zimage.py is a short rename table:

* ``kernel`` <-> ``weight`` (transposed); RMSNorm ``scale`` <-> ``weight``.
* ``x_embedder`` <-> ``all_x_embedder.{p}-1`` and ``final_layer`` <-> ``all_final_layer.{p}-1``
  (one patch size, no temporal patches); ``attention.to_out`` <-> ``attention.to_out.0``;
  ``adaLN_modulation`` <-> ``adaLN_modulation.0`` (blocks) / ``.1`` (final layer);
  ``t_embedder.linear_1/2`` <-> ``t_embedder.mlp.0/2``; ``cap_embedder.norm/linear`` <->
  ``cap_embedder.0/1`` (and ``siglip_embedder``).

The network: image tokens pass ``noise_refiner`` blocks (time-modulated), caption tokens
``context_refiner`` blocks (and SigLIP tokens ``siglip_refiner`` blocks; both unmodulated), then
one joint sequence passes ``layers``. Each item's caption (and image) is padded to a multiple of
32 tokens with a learned pad token that takes part in attention, and tokens carry 3-axis RoPE
positions (caption index, row, column), both exactly as diffusers builds them; we keep fixed
shapes and mask what a row does not use, and since attention does not depend on token order,
our sequence is ordered [clean tokens | noisy tokens] so the per-token modulation is two
broadcasts.

Conventions (METHOD.md 1): Z-Image's time is ``t = 1 - sigma`` (1 = clean) and it predicts
``x0 - eps``; we feed ``1 - sigma`` and return ``-output``, so callers see our ``v = eps - x0``.

Parameters are float32; ``config.dtype`` is the matmul compute dtype while norms, RoPE,
softmax, modulation and the residual stream stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.models.contract import Backbone
from danceopd_jax.models.mmdit import (
    _TIME_PROJ_DIM,
    REMAT_POLICIES,
    _layer_norm,
    _linear,
    _scan,
    _stack_trees,
    _stacked,
    timestep_embedding,
    validate_run_settings,
)

SEQ_MULTI_OF = 32  # diffusers pads every caption, image and SigLIP item to this many tokens
_ADALN_MAX = 256  # width of the time embedding: min(dim, 256)
_TIME_MID = 1024  # the time MLP's hidden width
_QK_EPS = 1e-5  # diffusers' Attention(eps=1e-5) for the q/k RMSNorms, whatever norm_eps is
_TEXT_KEYS = ("text", "text_mask")
# LoRA targets (models/lora.py): attention projections and the SwiGLU MLP of every block.
LORA_TARGETS = r"attention/(to_q|to_k|to_v|to_out)/kernel$|feed_forward/(w1|w2|w3)/kernel$"
_EDIT_KEYS = ("has_source", "text_prefix", "text_prefix_mask", "text_suffix", "text_suffix_mask")


@dataclass(frozen=True)
class ZImageConfig:
    """Hyper-parameters; names and defaults follow diffusers' ``ZImageTransformer2DModel``."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    # diffusers ignores n_kv_heads (its attention is plain multi-head); kept for config.json.
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)
    # Ours (as MMDiTConfig's): matmul dtype, remat policy, scanned main layers, attention kernel.
    dtype: str = "float32"
    remat: str = "none"
    # Stack the n_layers main blocks and apply them with one scan; their params then carry a
    # leading "layers" axis under "layers" (convert with stack_layers / unstack_layers).
    scan_layers: bool = False
    attention: str = "xla"

    def __post_init__(self) -> None:
        if len(self.all_patch_size) != 1 or tuple(self.all_f_patch_size) != (1,):
            raise ValueError(
                f"all_patch_size={self.all_patch_size}, all_f_patch_size={self.all_f_patch_size}: "
                "only one spatial patch size and no temporal patching ((1,)) are supported, as "
                "in the released Z-Image models."
            )
        if self.patch_size < 1 or self.in_channels < 1:
            raise ValueError(f"patch size {self.patch_size} and in_channels={self.in_channels} "
                             "must be >= 1.")
        if self.n_heads < 1 or self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of n_heads={self.n_heads}.")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ValueError(f"axes_dims={self.axes_dims} and axes_lens={self.axes_lens} must "
                             "each have 3 entries (caption index, row, column).")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ValueError(
                f"axes_dims={self.axes_dims} must be even and sum to the head width "
                f"dim/n_heads={self.head_dim}; fix axes_dims or dim / n_heads."
            )
        if self.n_layers < 1 or self.n_refiner_layers < 0:
            raise ValueError(f"n_layers={self.n_layers} must be >= 1 and n_refiner_layers="
                             f"{self.n_refiner_layers} >= 0.")
        if self.siglip_feat_dim is not None and self.siglip_feat_dim < 1:
            raise ValueError(f"siglip_feat_dim={self.siglip_feat_dim}: use None or a width >= 1.")
        validate_run_settings(self.attention, self.remat, self.dtype)

    @property
    def patch_size(self) -> int:
        return self.all_patch_size[0]

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU MLP's hidden width, as diffusers computes it."""
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, _ADALN_MAX)

    # MMDiTConfig's names, for the size formulas shared by both backbones (jobs/memory.py).
    @property
    def inner_dim(self) -> int:
        return self.dim

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def num_layers(self) -> int:
        """Blocks a target token passes: the noise refiner's and the main layers."""
        return self.n_layers + self.n_refiner_layers


def zimage_6b_config(**overrides) -> ZImageConfig:
    """Z-Image(-Turbo)'s 6B transformer (its config.json values)."""
    return ZImageConfig(**{"axes_lens": (1536, 512, 512), **overrides})


def tiny_zimage_config(**overrides) -> ZImageConfig:
    """A tiny random-weight config for tests and CPU runs (4 latent channels, width 64)."""
    return ZImageConfig(**{
        "in_channels": 4, "dim": 64, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2,
        "n_kv_heads": 2, "cap_feat_dim": 24, "axes_dims": (8, 12, 12),
        "axes_lens": (256, 64, 64), **overrides})


def stack_layers(params: dict, stack: Callable[[list[dict]], dict] = _stack_trees) -> dict:
    """Per-layer params ("layers": {i: tree}) -> the scanned layout ("layers": one tree with a
    leading layers axis). ``stack`` joins the per-layer trees (a layer absent from ``params``
    comes as {}); pass ``lora.stack_layers`` for a LoRA tree."""
    layers = params.get("layers", {})
    out = {k: v for k, v in params.items() if k != "layers"}
    if layers:
        out["layers"] = stack([layers.get(i, {}) for i in range(max(layers) + 1)])
    return out


def unstack_layers(params: dict, config: ZImageConfig) -> dict:
    """The inverse of stack_layers."""
    out = {k: v for k, v in params.items() if k != "layers"}
    if "layers" in params:
        out["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], params["layers"])
                         for i in range(config.n_layers)}
    return out


# ---------------------------------------------------------------------------
# Positions


def _ceil(n: jax.Array | int) -> jax.Array | int:
    return -(-n // SEQ_MULTI_OF) * SEQ_MULTI_OF


@functools.lru_cache(maxsize=8)
def _rope_tables(axes_dims: tuple[int, ...], axes_lens: tuple[int, ...],
                 theta: float) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per axis (cos, sin) ``[len, dim / 2]``: diffusers' ``RopeEmbedder.precompute_freqs_cis``
    (angles in float64, rounded to float32, then cos / sin in float32)."""
    tables = []
    for d, e in zip(axes_dims, axes_lens, strict=True):
        freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        angles = np.outer(np.arange(e, dtype=np.float64), freqs).astype(np.float32)
        tables.append((np.cos(angles), np.sin(angles)))
    return tuple(tables)


def _rope(config: ZImageConfig, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Position ids ``[B, N, 3]`` -> (cos, sin) ``[B, N, 1, head_dim / 2]``."""
    tables = _rope_tables(config.axes_dims, config.axes_lens, config.rope_theta)
    cos = [jnp.take(jnp.asarray(c), ids[..., a], axis=0, mode="clip")
           for a, (c, _) in enumerate(tables)]
    sin = [jnp.take(jnp.asarray(s), ids[..., a], axis=0, mode="clip")
           for a, (_, s) in enumerate(tables)]
    return jnp.concatenate(cos, -1)[:, :, None], jnp.concatenate(sin, -1)[:, :, None]


def _apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate consecutive pairs of ``x`` ``[B, N, H, hd]`` (float32) by the RoPE angles."""
    cos, sin = rope
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).reshape(x.shape)


def _ids(axis0: jax.Array, hw: np.ndarray) -> jax.Array:
    """Position ids ``[B, N, 3]`` from a per-row caption index ``[B, N]`` and (row, column)
    ``[N, 2]``."""
    hw = jnp.broadcast_to(jnp.asarray(hw, jnp.int32), (*axis0.shape, 2))
    return jnp.concatenate([axis0.astype(jnp.int32)[..., None], hw], -1)


@dataclass
class _Part:
    """A run of tokens in the sequence: features [B, N, D], which are attended to [B, N],
    their position ids [B, N, 3], and whether they take the clean-time modulation."""

    tokens: jax.Array
    valid: jax.Array
    ids: jax.Array
    clean: bool = False


def _join(parts: list[_Part]) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Parts (clean ones first) -> (tokens, valid, ids, number of clean tokens)."""
    clean = [p for p in parts if p.clean]
    ordered = clean + [p for p in parts if not p.clean]
    n_clean = sum(p.tokens.shape[1] for p in clean)
    return (jnp.concatenate([p.tokens for p in ordered], 1),
            jnp.concatenate([p.valid for p in ordered], 1),
            jnp.concatenate([p.ids for p in ordered], 1), n_clean)


def _caption_ids(parts: list[_Part], counts: list[jax.Array],
                 starts: list[jax.Array]) -> list[_Part]:
    """Caption parts with diffusers' position ids. Piece j (n_j real tokens, P_j = ceil32(n_j)
    in the sequence) should sit at caption index start_j, start_j + 1, ...; diffusers builds
    each piece's ids as those P_j followed by P_j - n_j extra (0, 0, 0) ids and reads an item's
    ids in order, so with several pieces (omni) later pieces take shifted ids, some (0, 0, 0).
    The released weights run with these ids, so we reproduce them."""
    padded = [_ceil(n) for n in counts]
    ids_lens = [2 * p - n for p, n in zip(padded, counts, strict=True)]
    ids_starts, offsets = [jnp.zeros_like(counts[0])], [jnp.zeros_like(counts[0])]
    for p, q in zip(padded[:-1], ids_lens[:-1], strict=True):
        offsets.append(offsets[-1] + p)
        ids_starts.append(ids_starts[-1] + q)
    out = []
    for part, offset in zip(parts, offsets, strict=True):
        c = offset[:, None] + jnp.arange(part.tokens.shape[1])[None]  # index in the item
        axis0 = jnp.zeros_like(c)
        for p, r, start in zip(padded, ids_starts, starts, strict=True):
            u = c - r[:, None]
            axis0 = jnp.where((u >= 0) & (u < p[:, None]), start[:, None] + u, axis0)
        out.append(_Part(part.tokens, part.valid, _ids(axis0, np.zeros((c.shape[1], 2))),
                         part.clean))
    return out


# ---------------------------------------------------------------------------
# Modules


def _rms_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(dim, epsilon=eps, dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with RMS qk-norm and RoPE; no biases."""

    def __init__(self, config: ZImageConfig, *, rngs: nnx.Rngs):
        dim, dt = config.dim, config.dtype
        self.heads, self.head_dim = config.n_heads, config.head_dim
        self.dtype = jnp.dtype(dt)
        self.implementation = config.attention
        for name in ("to_q", "to_k", "to_v"):
            setattr(self, name, _linear(dim, dim, ("embed", "heads"), dtype=dt, rngs=rngs,
                                        use_bias=False))
        self.to_out = _linear(dim, dim, ("heads", "embed"), dtype=dt, rngs=rngs, use_bias=False)
        self.norm_q = _rms_norm(self.head_dim, _QK_EPS, rngs) if config.qk_norm else None
        self.norm_k = _rms_norm(self.head_dim, _QK_EPS, rngs) if config.qk_norm else None

    def _heads(self, proj: nnx.Linear, norm: nnx.RMSNorm | None, x: jax.Array,
               rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        y = proj(x).reshape(*x.shape[:2], self.heads, self.head_dim).astype(jnp.float32)
        if norm is not None:
            y = norm(y)
        if rope is not None:
            y = _apply_rope(y, rope)
        return y.astype(self.dtype)

    def __call__(self, x: jax.Array, mask: jax.Array,
                 rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        """``x`` [B, N, D], ``mask`` [B, N] bool (keys attended to)."""
        q = self._heads(self.to_q, self.norm_q, x, rope)
        k = self._heads(self.to_k, self.norm_k, x, rope)
        v = self._heads(self.to_v, None, x, None)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :],
                                           implementation=self.implementation)
        return self.to_out(out.reshape(*out.shape[:2], -1)).astype(jnp.float32)


class FeedForward(nnx.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, dim: int, hidden: int, *, dtype: str, rngs: nnx.Rngs):
        self.w1 = _linear(dim, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs, use_bias=False)
        self.w2 = _linear(hidden, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs, use_bias=False)
        self.w3 = _linear(dim, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs, use_bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(nnx.silu(self.w1(x)) * self.w3(x)).astype(jnp.float32)


def _per_token(x: jax.Array, clean: jax.Array | None, noisy: jax.Array, n_clean: int) -> jax.Array:
    """``x`` [B, N, D] times ``clean`` [B, D] on its first ``n_clean`` tokens, ``noisy`` on the
    rest (diffusers' ``select_per_token`` on our clean-first order)."""
    if n_clean == 0:
        return x * noisy[:, None]
    return jnp.concatenate([x[:, :n_clean] * clean[:, None], x[:, n_clean:] * noisy[:, None]], 1)


class Block(nnx.Module):
    """``ZImageTransformerBlock``: pre/post RMS-normed attention and SwiGLU, each scaled by
    ``1 + scale`` and gated by ``tanh(gate)`` from the time embedding when ``modulation``."""

    def __init__(self, config: ZImageConfig, *, modulation: bool, rngs: nnx.Rngs):
        dim, eps = config.dim, config.norm_eps
        self.attention = Attention(config, rngs=rngs)
        self.feed_forward = FeedForward(dim, config.hidden_dim, dtype=config.dtype, rngs=rngs)
        self.attention_norm1 = _rms_norm(dim, eps, rngs)
        self.attention_norm2 = _rms_norm(dim, eps, rngs)
        self.ffn_norm1 = _rms_norm(dim, eps, rngs)
        self.ffn_norm2 = _rms_norm(dim, eps, rngs)
        self.adaLN_modulation = (
            _linear(config.adaln_dim, 4 * dim, (None, "embed"), dtype=config.dtype, rngs=rngs)
            if modulation else None)

    def __call__(self, x: jax.Array, mask: jax.Array, rope: tuple[jax.Array, jax.Array],
                 temb: tuple[jax.Array | None, jax.Array] | None = None,
                 n_clean: int = 0) -> jax.Array:
        """``temb`` = (clean, noisy) time embeddings [B, A] (clean None when ``n_clean`` = 0)."""
        if self.adaLN_modulation is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), mask, rope))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        clean, noisy = (None if e is None else jnp.split(
            self.adaLN_modulation(e).astype(jnp.float32), 4, axis=-1) for e in temb)

        def mod(i: int, fn: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
            return (None if clean is None else fn(clean[i])), fn(noisy[i])

        scale_msa, gate_msa, scale_mlp, gate_mlp = (
            mod(i, fn) for i, fn in enumerate((lambda m: 1 + m, jnp.tanh) * 2))
        attn = self.attention(_per_token(self.attention_norm1(x), *scale_msa, n_clean), mask, rope)
        x = x + _per_token(self.attention_norm2(attn), *gate_msa, n_clean)
        ff = self.feed_forward(_per_token(self.ffn_norm1(x), *scale_mlp, n_clean))
        return x + _per_token(self.ffn_norm2(ff), *gate_mlp, n_clean)


class _TimestepEmbedder(nnx.Module):
    def __init__(self, config: ZImageConfig, *, rngs: nnx.Rngs):
        dt = config.dtype
        self.linear_1 = _linear(256, _TIME_MID, (None, "mlp"), dtype=dt, rngs=rngs)
        self.linear_2 = _linear(_TIME_MID, config.adaln_dim, ("mlp", None), dtype=dt, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.linear_2(nnx.silu(self.linear_1(timestep_embedding(t)))).astype(jnp.float32)


class _FeatureEmbedder(nnx.Module):
    """RMSNorm then Linear (diffusers' ``cap_embedder`` / ``siglip_embedder``)."""

    def __init__(self, features: int, config: ZImageConfig, *, rngs: nnx.Rngs):
        self.norm = _rms_norm(features, config.norm_eps, rngs)
        self.linear = _linear(features, config.dim, (None, "embed"), dtype=config.dtype,
                              rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(self.norm(x.astype(jnp.float32))).astype(jnp.float32)


class FinalLayer(nnx.Module):
    def __init__(self, config: ZImageConfig, *, rngs: nnx.Rngs):
        dim, dt, p = config.dim, config.dtype, config.patch_size
        self.adaLN_modulation = _linear(config.adaln_dim, dim, (None, "embed"), dtype=dt,
                                        rngs=rngs)
        self.linear = _linear(dim, p * p * config.in_channels, ("embed", None), dtype=dt,
                              rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        scale = 1 + self.adaLN_modulation(nnx.silu(temb)).astype(jnp.float32)
        return self.linear(_layer_norm(x) * scale[:, None]).astype(jnp.float32)


def _pad_token(dim: int) -> nnx.Param:
    return nnx.Param(jnp.zeros((1, dim), jnp.float32), out_sharding=(None, "embed"),
                     eager_sharding=False)


# ---------------------------------------------------------------------------
# Model


class ZImage(nnx.Module):
    """Z-Image's transformer predicting our flow-matching velocity.

    ``__call__(z, sigma, cond)``:
      * ``z`` [B, H, W, C] float32 noisy target latent (channels-last); ``sigma`` [B] in [0, 1].
      * ``cond["text"]`` [B, Lt, cap_feat_dim], ``cond["text_mask"]`` [B, Lt] bool: the caption
        features (Qwen3's second-to-last hidden states) and which tokens are real.
      * Without ``cond["source"]``: the text-to-image input of ``ZImagePipeline`` (diffusers'
        plain mode).
      * With ``cond["source"]`` [B, Hs, Ws, C] (a clean source latent) and ``"has_source"`` [B]
        bool: the omni input of ``ZImageOmniPipeline`` with one condition image. Its caption is
        three separately encoded pieces: ``"text_prefix"`` / ``"text_prefix_mask"`` (the
        template before the image), ``"text"`` (the prompt piece) and ``"text_suffix"`` /
        ``"text_suffix_mask"`` (the template's end); optional ``"text_omni"`` /
        ``"text_omni_mask"``, the prompt piece that rows with a source read instead of
        ``"text"`` (prepared data: CFG's empty prompt differs between the pipelines' two
        templates). ``"siglip"`` [B, Hg, Wg, siglip_feat_dim]
        (SigLIP features of the source) is used when the config has ``siglip_feat_dim``. A row
        whose ``has_source`` is False is the omni pipeline without condition images: its
        ``"text"`` holds that prompt, and its source, prefix, suffix and SigLIP are ignored.
    Returns ``v`` [B, H, W, C] float32.
    """

    def __init__(self, config: ZImageConfig, *, rngs: nnx.Rngs):
        self.config = config
        dim, dt = config.dim, config.dtype
        p = config.patch_size
        self.x_embedder = _linear(p * p * config.in_channels, dim, (None, "embed"), dtype=dt,
                                  rngs=rngs)
        self.final_layer = FinalLayer(config, rngs=rngs)
        self.t_embedder = _TimestepEmbedder(config, rngs=rngs)
        self.cap_embedder = _FeatureEmbedder(config.cap_feat_dim, config, rngs=rngs)
        self.x_pad_token = _pad_token(dim)
        self.cap_pad_token = _pad_token(dim)
        refiners = range(config.n_refiner_layers)
        self.noise_refiner = nnx.List(
            [Block(config, modulation=True, rngs=rngs) for _ in refiners])
        self.context_refiner = nnx.List(
            [Block(config, modulation=False, rngs=rngs) for _ in refiners])
        if config.siglip_feat_dim is not None:
            self.siglip_embedder = _FeatureEmbedder(config.siglip_feat_dim, config, rngs=rngs)
            self.siglip_refiner = nnx.List(
                [Block(config, modulation=False, rngs=rngs) for _ in refiners])
            self.siglip_pad_token = _pad_token(dim)

        def layer(i: int, rngs: nnx.Rngs) -> Block:
            return Block(config, modulation=True, rngs=rngs)

        if config.scan_layers:
            self.layers = _stacked(layer, range(config.n_layers), rngs)
        else:
            self.layers = nnx.List([layer(i, rngs) for i in range(config.n_layers)])

    # ---- inputs -> parts

    @staticmethod
    def _prompt_piece(cond: Mapping[str, jax.Array], has_source: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
        """The omni caption's prompt piece: ``text``, or ``text_omni`` on rows with a source
        when cond has it (the two templates encode the empty prompt of CFG differently)."""
        if "text_omni" not in cond:
            return cond["text"], cond["text_mask"]
        pick = has_source.astype(bool)[:, None]
        return (jnp.where(pick[..., None], cond["text_omni"], cond["text"]),
                jnp.where(pick, cond["text_omni_mask"], cond["text_mask"]))

    def _caption(self, feats: jax.Array, mask: jax.Array,
                 present: jax.Array | None = None) -> tuple[_Part, jax.Array]:
        """A caption piece: real tokens first, then pad tokens up to a multiple of 32 (ids are
        set by _caption_ids). Returns the part and its real-token count (0 where absent)."""
        length = feats.shape[1]
        mask = mask.astype(bool)
        if present is not None:
            mask &= present[:, None]
        order = jnp.argsort(~mask, axis=1, stable=True)  # real tokens first, in order
        feats = jnp.take_along_axis(feats.astype(jnp.float32), order[..., None], axis=1)
        n = mask.sum(1)
        width = _ceil(length)
        feats = jnp.pad(feats, ((0, 0), (0, width - length), (0, 0)))
        k = jnp.arange(width)[None]
        tokens = jnp.where((k < n[:, None])[..., None], self.cap_embedder(feats),
                           self.cap_pad_token[...])
        return _Part(tokens, k < _ceil(n)[:, None], jnp.zeros((*k.shape, 3), jnp.int32)), n

    def _image(self, x: jax.Array, axis0: jax.Array, present: jax.Array | None = None,
               clean: bool = False) -> _Part:
        """Patch tokens of a latent ``[B, H, W, C]`` at positions (axis0, row, column), then pad
        tokens at (0, 0, 0) up to a multiple of 32."""
        b, h, w, c = x.shape
        p = self.config.patch_size
        gh, gw = h // p, w // p
        n = gh * gw
        patches = x.astype(jnp.float32).reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        tokens = self.x_embedder(patches.reshape(b, n, p * p * c)).astype(jnp.float32)
        pad = _ceil(n) - n
        tokens = jnp.concatenate(
            [tokens, jnp.broadcast_to(self.x_pad_token[...], (b, pad, tokens.shape[-1]))], 1)
        rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        hw = np.pad(np.stack([rows.ravel(), cols.ravel()], -1), ((0, pad), (0, 0)))
        real = np.arange(n + pad) < n
        ids = _ids(jnp.where(real[None], axis0[:, None], 0), hw)
        valid = jnp.ones((b, n + pad), bool) if present is None else jnp.broadcast_to(
            present[:, None], (b, n + pad))
        return _Part(tokens, valid, ids, clean)

    def _siglip(self, feats: jax.Array, axis0: jax.Array, source_hw: tuple[int, int],
                present: jax.Array) -> list[_Part]:
        """The source's SigLIP tokens (positions stretched over the source latent's pixel grid,
        as diffusers does) and the target's placeholder: 32 pad tokens."""
        b, gh, gw, c = feats.shape
        n = gh * gw
        pad = _ceil(n) - n
        # diffusers flattens the [H, W, C] features as permute(2, 0, 1).reshape(H * W, C),
        # i.e. in channel-major memory order: the released weights expect that layout.
        flat = feats.astype(jnp.float32).transpose(0, 3, 1, 2).reshape(b, n, c)
        sig_pad = self.siglip_pad_token[...]
        tokens = jnp.concatenate([self.siglip_embedder(flat),
                                  jnp.broadcast_to(sig_pad, (b, pad, sig_pad.shape[-1]))], 1)
        rows, cols = np.meshgrid(np.arange(gh, dtype=np.float32),
                                 np.arange(gw, dtype=np.float32), indexing="ij")
        rows = (rows / np.float32(max(gh - 1, 1)) * np.float32(source_hw[0] - 1))
        cols = (cols / np.float32(max(gw - 1, 1)) * np.float32(source_hw[1] - 1))
        hw = np.pad(np.stack([rows.ravel(), cols.ravel()], -1).astype(np.int32),
                    ((0, pad), (0, 0)))
        real = np.arange(n + pad) < n
        valid = jnp.broadcast_to(present[:, None], (b, n + pad))
        source = _Part(tokens, valid, _ids(jnp.where(real[None], axis0[:, None], 0), hw), True)
        placeholder = _Part(jnp.broadcast_to(sig_pad, (b, SEQ_MULTI_OF, sig_pad.shape[-1])),
                            valid[:, :1].repeat(SEQ_MULTI_OF, 1),
                            jnp.zeros((b, SEQ_MULTI_OF, 3), jnp.int32))
        return [source, placeholder]

    # ---- blocks

    def _run(self, blocks, parts: list[_Part], temb: tuple | None,
             scanned: bool = False) -> list[_Part]:
        """Run a stack of blocks over the joined parts; return the parts updated."""
        x, valid, ids, n_clean = _join(parts)
        # A row with nothing to attend to (a stream it does not use) attends to everything
        # instead: finite values, masked out downstream.
        mask = valid | ~valid.any(1, keepdims=True)
        rope = _rope(self.config, ids)

        def step(block: Block, x: jax.Array) -> tuple[jax.Array]:
            return (block(x, mask, rope, temb, n_clean),)

        policy = REMAT_POLICIES[self.config.remat]
        step = step if policy is None else nnx.remat(step, policy=policy)
        if scanned:
            (x,) = _scan(step, blocks, (x,))
        else:
            for block in blocks:
                (x,) = step(block, x)
        order = sorted(range(len(parts)), key=lambda i: not parts[i].clean)  # as _join
        sizes = np.cumsum([parts[i].tokens.shape[1] for i in order])[:-1]
        out = list(parts)
        for i, tokens in zip(order, jnp.split(x, sizes, axis=1), strict=True):
            out[i] = _Part(tokens, parts[i].valid, parts[i].ids, parts[i].clean)
        return out

    # ---- forward

    def _check_inputs(self, z: jax.Array, sigma: jax.Array, cond: Mapping[str, jax.Array]) -> None:
        cfg = self.config
        edit = "source" in cond
        required = _TEXT_KEYS + (_EDIT_KEYS if edit else ())
        missing = [k for k in required if k not in cond]
        if missing:
            raise KeyError(f"cond is missing {missing}; Z-Image needs {required}"
                           + (" with 'source' (the omni layout)." if edit else "."))
        if "siglip" in cond and (not edit or cfg.siglip_feat_dim is None):
            raise ValueError("cond['siglip'] needs cond['source'] and a config with "
                             f"siglip_feat_dim (it is {cfg.siglip_feat_dim}).")
        if "siglip" in cond and (cond["siglip"].ndim != 4
                                 or cond["siglip"].shape[-1] != cfg.siglip_feat_dim):
            raise ValueError(f"cond['siglip'] has shape {cond['siglip'].shape}; expected "
                             f"[B, Hg, Wg, {cfg.siglip_feat_dim}].")
        p = cfg.patch_size
        for name, x in [("z", z)] + ([("cond['source']", cond["source"])] if edit else []):
            if x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % p or x.shape[2] % p:
                raise ValueError(f"{name} has shape {x.shape}; expected [B, H, W, "
                                 f"{cfg.in_channels}] with H and W multiples of patch {p}.")
            if x.shape[1] // p > cfg.axes_lens[1] or x.shape[2] // p > cfg.axes_lens[2]:
                raise ValueError(f"{name} has {x.shape[1] // p}x{x.shape[2] // p} patches, more "
                                 f"than axes_lens={cfg.axes_lens} allows; use a smaller image.")
        if sigma.shape != z.shape[:1]:
            raise ValueError(f"sigma has shape {sigma.shape}; expected [B]={z.shape[:1]}.")
        texts = ["text"] + (["text_prefix", "text_suffix"] if edit else [])
        for name in texts:
            t, m = cond[name], cond[f"{name}_mask"]
            if t.ndim != 3 or t.shape[-1] != cfg.cap_feat_dim or m.shape != t.shape[:2]:
                raise ValueError(f"cond['{name}'] {t.shape} / cond['{name}_mask'] {m.shape}: "
                                 f"expected [B, L, {cfg.cap_feat_dim}] and [B, L].")
        if "text_omni" in cond and (cond["text_omni"].shape != cond["text"].shape
                                    or cond["text_omni_mask"].shape != cond["text_mask"].shape):
            raise ValueError(f"cond['text_omni'] {cond['text_omni'].shape} / "
                             f"cond['text_omni_mask'] {cond['text_omni_mask'].shape} must have "
                             f"the shapes of cond['text'] {cond['text'].shape} and its mask.")
        span = sum(_ceil(cond[name].shape[1]) + 2 for name in texts) + 1
        if span >= cfg.axes_lens[0]:
            raise ValueError(f"captions of {[cond[n].shape[1] for n in texts]} tokens need "
                             f"caption positions up to {span}, beyond axes_lens[0]="
                             f"{cfg.axes_lens[0]}; use shorter text.")

    def __call__(self, z: jax.Array, sigma: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
        self._check_inputs(z, sigma, cond)
        cfg = self.config
        b, h, w, _ = z.shape
        t = 1.0 - sigma.astype(jnp.float32)  # Z-Image's time: 1 = clean
        noisy = self.t_embedder(t * cfg.t_scale)
        if "source" in cond:
            has_source = cond["has_source"].astype(bool)
            clean = self.t_embedder(jnp.full_like(t, cfg.t_scale))
            # Caption pieces at running positions from 1, two slots left after each piece for
            # its image and SigLIP tokens; a row without a source starts at its prompt.
            prefix, n0 = self._caption(cond["text_prefix"], cond["text_prefix_mask"],
                                       has_source)
            prefix.clean = True
            prompt, n1 = self._caption(*self._prompt_piece(cond, has_source))
            suffix, n2 = self._caption(cond["text_suffix"], cond["text_suffix_mask"],
                                       has_source)
            start = jnp.where(has_source, n0 + 3, 1)
            ones = jnp.ones_like(n0)
            captions = _caption_ids([prefix, prompt, suffix], [n0, n1, n2],
                                    [ones, start, start + n1 + 2])
            images = [self._image(cond["source"], n0 + 1, has_source, clean=True),
                      self._image(z, start + n1)]
            siglip = []
            if "siglip" in cond and cfg.siglip_feat_dim is not None:
                siglip = self._siglip(cond["siglip"], n0 + 2, cond["source"].shape[1:3],
                                      has_source)
            temb = (clean, noisy)
        else:
            prompt, n1 = self._caption(cond["text"], cond["text_mask"])
            captions = _caption_ids([prompt], [n1], [jnp.ones_like(n1)])
            images = [self._image(z, _ceil(n1) + 1)]
            siglip = []
            temb = (None, noisy)

        images = self._run(self.noise_refiner, images, temb)
        captions = self._run(self.context_refiner, captions, None)
        if siglip:
            siglip = self._run(self.siglip_refiner, siglip, None)
        parts = self._run(self.layers, captions + images + siglip, temb,
                          scanned=cfg.scan_layers)
        target = parts[len(captions) + len(images) - 1]

        p = cfg.patch_size
        gh, gw = h // p, w // p
        out = self.final_layer(target.tokens[:, : gh * gw], noisy)
        out = out.reshape(b, gh, gw, p, p, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)
        return -out  # Z-Image predicts x0 - eps


def forward_flops(config: ZImageConfig, batch: int, image_tokens: int, other_tokens: int,
                  with_source: bool) -> int:
    """Matmul FLOPs of one forward (the contract's formula): `other_tokens` are every non-image
    token (caption pieces and SigLIP, counted as caption); padding to multiples of 32 is left
    out."""
    d, b, t, a = config.dim, batch, other_tokens, config.adaln_dim
    segments = 2 if with_source else 1  # time embeddings: clean and noisy
    n = image_tokens * segments
    patch = config.patch_size ** 2 * config.in_channels

    def block(tokens: int, modulated: bool) -> int:
        flops = 2 * b * tokens * 4 * d * d + 4 * b * tokens ** 2 * d  # q, k, v, out; attention
        flops += 2 * b * tokens * 3 * d * config.hidden_dim  # SwiGLU
        return flops + (2 * b * segments * a * 4 * d if modulated else 0)

    flops = 2 * b * n * patch * d + 2 * b * t * config.cap_feat_dim * d  # embedders
    flops += 2 * b * segments * (_TIME_PROJ_DIM + a) * _TIME_MID  # time MLP
    flops += config.n_refiner_layers * (block(n, True) + block(t, False))  # refiners
    flops += config.n_layers * block(n + t, True)
    return flops + 2 * b * a * d + 2 * b * image_tokens * d * patch  # final layer


def example_cond(key: jax.Array, config: ZImageConfig, batch: int,
                 text_tokens: int) -> dict[str, jax.Array]:
    """Random conditions in the omni edit layout: the caption in three pieces (the prompt and
    the two 32-token template pieces, 5 tokens of each used)."""
    piece = 0.1 * jax.random.normal(key, (batch, SEQ_MULTI_OF, config.cap_feat_dim))
    short = jnp.broadcast_to(jnp.arange(SEQ_MULTI_OF) < 5, (batch, SEQ_MULTI_OF))
    return {"text": 0.1 * jax.random.normal(key, (batch, text_tokens, config.cap_feat_dim)),
            "text_mask": jnp.ones((batch, text_tokens), bool),
            "text_prefix": piece, "text_prefix_mask": short,
            "text_suffix": piece, "text_suffix_mask": short}


def unscanned(config: ZImageConfig, params: dict) -> tuple[ZImageConfig, dict]:
    """(config, params) in the per-layer layout diffusers uses; params may also be a LoRA
    tree, which mirrors them."""
    if not config.scan_layers:
        return config, params
    return dataclasses.replace(config, scan_layers=False), unstack_layers(params, config)


def stacked(config: ZImageConfig, params: dict, stack: Callable[[list[dict]], dict]) -> dict:
    """Per-layer params (or a LoRA tree) in the layout ``config`` asks for."""
    return stack_layers(params, stack=stack) if config.scan_layers else params


# Prepared data (worlds/prepared.py, interop/zimage_conditions.py): every row has the prompt
# piece "text" / "text_mask" (the T2I template, or the omni template's prompt piece on a row with
# a source image) and rows with a source their "siglip" features; the empty-prompt entries hold
# both templates' empty prompts ("text", "text_omni") and the omni template's constant pieces.
_TEMPLATE_PIECES = ("text_prefix", "text_prefix_mask", "text_suffix", "text_suffix_mask")


def precomputed(null: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]
                ) -> tuple[dict, dict]:
    """Prepared rows -> the module's cond (the omni layout when the batch has sources) and the
    empty prompt's entries, which CFG swaps in: per row the empty prompt of its template."""
    cond = {"text": batch["text"], "text_mask": batch["text_mask"]}
    empty = {"text": null["text"], "text_mask": null["text_mask"]}
    if "source" not in batch:
        return cond, empty
    n = batch["text"].shape[0]
    cond |= {k: jnp.broadcast_to(null[k], (n, *null[k].shape[1:])) for k in _TEMPLATE_PIECES}
    cond |= {"text_omni": batch["text"], "text_omni_mask": batch["text_mask"]}
    cond |= {k: batch[k] for k in ("siglip",) if k in batch}
    return cond, empty | {k: null[k] for k in ("text_omni", "text_omni_mask")}


def data_problems(config: ZImageConfig, latent: tuple[int, ...],
                  features: Mapping[str, tuple[int, ...]]) -> list[str]:
    h, w, c = latent
    p, lens = config.patch_size, config.axes_lens
    problems = []
    if c != config.in_channels:
        problems.append(f"latents have {c} channels, the transformer takes {config.in_channels}")
    if h % p or w % p or h // p > lens[1] or w // p > lens[2]:
        problems.append(f"latents are {h}x{w}; the transformer needs multiples of patch size {p}, "
                        f"at most {lens[1] * p}x{lens[2] * p} (axes_lens={lens})")
    if not {"text", "text_mask"} <= set(features):
        return [*problems, f"the rows carry {sorted(features)}, Z-Image reads text and text_mask"]
    length, width = features["text"]
    if width != config.cap_feat_dim:
        problems.append(f"text features are {width} wide, the transformer's cap_feat_dim is "
                        f"{config.cap_feat_dim}")
    if 3 * (_ceil(length) + 2) + 1 >= lens[0]:
        problems.append(f"prompts of {length} tokens need caption positions beyond axes_lens[0]="
                        f"{lens[0]}; prepare with a smaller --max_sequence_length")
    siglip = features.get("siglip")
    if config.siglip_feat_dim is not None and siglip is None:
        problems.append(f"the transformer reads SigLIP features of source images (siglip_feat_dim="
                        f"{config.siglip_feat_dim}) but the data has none; prepare with a "
                        "ZImageOmniPipeline folder (it holds siglip and siglip_processor)")
    elif siglip is not None and siglip[-1] != config.siglip_feat_dim:
        problems.append(f"SigLIP features are {siglip[-1]} wide, the transformer's siglip_feat_dim "
                        f"is {config.siglip_feat_dim}")
    return problems


# The omni edit sequence besides the image tokens: a 512-token prompt piece and the two 32-token
# template pieces, 256 SigLIP tokens (Siglip2ImageProcessor's default max_num_patches) and the
# target's 32-token SigLIP placeholder.
OTHER_TOKENS = 512 + 2 * 32 + 256 + 32

BACKBONE = Backbone(
    "zimage", ZImageConfig, ZImage, forward_flops, example_cond, unscanned, LORA_TARGETS,
    tiny_zimage_config, stacked, precomputed, data_problems, padding_tokens=2 * SEQ_MULTI_OF,
    references={"Z-Image-6B": (zimage_6b_config, OTHER_TOKENS)})

"""SD3-style MMDiT backbone (flow-matching velocity model) in Flax NNX.

Module and parameter names mirror diffusers' ``SD3Transformer2DModel`` so that
a checkpoint key mapper is a short rename table:

* ``kernel`` <-> ``weight`` (transposed); RMSNorm ``scale`` <-> ``weight``.
* ``pos_embed.proj``: a Linear over flattened ``(p_h, p_w, C)`` patches; the
  diffusers Conv2d weight ``[D, C, p, p]`` maps via ``transpose(2, 3, 1, 0)``
  then ``reshape(p * p * C, D)``.
* ``attn.to_out`` <-> ``attn.to_out.0``; ``ff.fc1`` <-> ``ff.net.0.proj``;
  ``ff.fc2`` <-> ``ff.net.2`` (same for ``ff_context``).
* ``source_embed`` is ours (no diffusers counterpart; zero-initialised so a
  text-to-image checkpoint behaves identically on target tokens).
* ``coarse_scale`` is ours too (no parameters, no diffusers counterpart): a
  second, coarser scale of image tokens in the same sequence.

Edit conditioning uses an "omni" layout: the joint sequence is
``[text | clean source tokens | noisy target tokens]``. Source tokens get the
adaLN modulation of ``sigma = 0``; target tokens (and the text stream) that of
the sample's ``sigma``. Internally the image stream is kept as
``[B, S, N, D]`` with ``S`` segments (``S = 2``: source, target; ``S = 1``
when ``cond`` carries no ``"source"``), so per-token time conditioning is a
broadcast of per-segment modulations ``[B, S, 1, D]``.

Parameters are float32; ``config.dtype`` is the matmul compute dtype while
norms, softmax, modulation and the residual stream stay float32. Kernels carry
logical axis names (``embed``, ``heads``, ``mlp``) as non-eager sharding
metadata; read them with ``nnx.get_partition_spec``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.models.contract import Backbone
from danceopd_jax.models.lora import DEFAULT_TARGETS

_LN_EPS = 1e-6
_TIME_PROJ_DIM = 256
_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
_COND_KEYS = ("text", "text_mask", "pooled")
# What a block's backward may keep from its forward (None: no remat, keep everything).
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}



def validate_run_settings(attention: str, remat: str, dtype: str) -> None:
    """A backbone config's run settings (how it runs, not what it computes)."""
    if attention not in ("xla", "cudnn"):
        raise ValueError(f"attention={attention!r}: use 'xla' or 'cudnn' (GPU).")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: use one of {tuple(REMAT_POLICIES)}.")
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is unsupported; use one of {_COMPUTE_DTYPES}.")


@dataclass(frozen=True)
class MMDiTConfig:
    """Hyper-parameters; names and defaults follow diffusers (SD3 medium)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    dtype: str = "float32"
    # Rematerialisation of each block in the backward pass (REMAT_POLICIES): "none" keeps every
    # activation, "block" keeps only each block's inputs and recomputes the rest, "dots" also
    # keeps the projections' matmul outputs (more memory, less recomputation).
    remat: str = "none"
    # Stack each run of identical blocks and apply it with one scan (compile time grows with
    # the number of distinct block kinds, not with depth). Params then live under
    # "block_groups" with a leading "layers" axis: convert with stack_blocks / unstack_blocks.
    scan_layers: bool = False
    # jax.nn.dot_product_attention's implementation: "xla" (any platform) or "cudnn" (fused
    # flash attention on NVIDIA GPUs, bf16/fp16 only).
    attention: str = "xla"
    # Ours, not diffusers': 0 = none; k > 0 adds one coarse token per k x k block of patch
    # tokens to each image segment, the mean of the block's patch projections at the sincos
    # position of the block's centre. They join every attention and their outputs are dropped,
    # so the patch tokens of a block can agree on what the block holds (docs/teachers.md, "What
    # the base's T2I misses"). No parameters: the same weights run with or without them.
    coarse_scale: int = 0

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.sample_size % self.patch_size:
            raise ValueError(
                f"sample_size={self.sample_size} must be a multiple of "
                f"patch_size={self.patch_size}; pick a sample_size divisible by it."
            )
        inner = self.num_attention_heads * self.attention_head_dim
        if self.caption_projection_dim != inner:
            raise ValueError(
                f"caption_projection_dim={self.caption_projection_dim} must equal "
                f"num_attention_heads*attention_head_dim={inner}; set it to {inner}."
            )
        if inner % 4:
            raise ValueError(
                f"inner width {inner} must be divisible by 4 for the 2D sincos "
                "position embedding; change attention_head_dim or num_attention_heads."
            )
        # The output token is a linear map of the hidden one, so a patch holding more values
        # than the width cannot carry the velocity's per-pixel noise (docs/teachers.md: a
        # patch-8 model at width 128 never learned to draw).
        p, out = self.patch_size, self.out_channels
        if p * p * out > inner:
            raise ValueError(
                f"patch_size={p} gives tokens of {p}x{p}x{out} = {p * p * out} values, more "
                f"than the width {inner}: a velocity field cannot carry its noise through a "
                f"narrower token. Use a width >= {p * p * out} or a smaller patch size.")
        if self.pos_embed_max_size < self.sample_size // self.patch_size:
            raise ValueError(
                f"pos_embed_max_size={self.pos_embed_max_size} is smaller than the "
                f"patch grid {self.sample_size // self.patch_size}; raise it to at "
                "least sample_size // patch_size."
            )
        grid, k = self.sample_size // self.patch_size, self.coarse_scale
        if k < 0 or (k and grid % k):
            raise ValueError(
                f"coarse_scale={k} must be 0 (no coarse tokens) or divide the patch grid "
                f"{grid} (sample_size // patch_size); use one of "
                f"{[0] + [d for d in range(1, grid + 1) if grid % d == 0]}.")
        if self.num_layers < 1:
            raise ValueError(f"num_layers={self.num_layers} must be >= 1.")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"dual_attention_layers contains {bad}, outside [0, {self.num_layers}); "
                "use block indices below num_layers."
            )
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm={self.qk_norm!r} is unsupported; use None or 'rms_norm'.")
        validate_run_settings(self.attention, self.remat, self.dtype)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def sd35_medium_config(**overrides) -> MMDiTConfig:
    """SD3.5-Medium's transformer (MMDiT-X, 2.24B parameters; diffusers' config.json values)."""
    return MMDiTConfig(**{
        "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
        "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)),
        "qk_norm": "rms_norm", **overrides})


def mmdit_6b_config(**overrides) -> MMDiTConfig:
    """A 6.05B-parameter member of the family (18 joint blocks, width 3072 = 24 heads x 128):
    the size of today's 6B image DiTs such as Z-Image, for planning memory and throughput."""
    return MMDiTConfig(**{
        "num_layers": 18, "num_attention_heads": 24, "attention_head_dim": 128,
        "caption_projection_dim": 3072, "pos_embed_max_size": 192, "qk_norm": "rms_norm",
        **overrides})


def block_groups(config: MMDiTConfig) -> list[range]:
    """Runs of consecutive blocks of the same kind (dual attention or not; the last block's
    text stream ends early), in order: what scan_layers stacks together."""
    def kind(i: int) -> tuple[bool, bool]:
        return i in config.dual_attention_layers, i == config.num_layers - 1

    groups: list[range] = []
    for i in range(config.num_layers):
        if groups and kind(groups[-1].start) == kind(i):
            groups[-1] = range(groups[-1].start, i + 1)
        else:
            groups.append(range(i, i + 1))
    return groups


def _stack_trees(trees: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def stack_blocks(params: dict, config: MMDiTConfig,
                 stack: Callable[[list[dict]], dict] = _stack_trees) -> dict:
    """Per-block params ("transformer_blocks": {i: tree}) -> the scanned layout
    ("block_groups": {g: tree with a leading layers axis}).

    ``stack`` joins one group's per-block trees (a block absent from ``params`` comes as {});
    pass ``lora.stack_layers`` for a LoRA tree, whose blocks may differ in ranks and targets.
    """
    out = {k: v for k, v in params.items() if k != "transformer_blocks"}
    blocks = params.get("transformer_blocks", {})
    groups = {g: stack([blocks.get(i, {}) for i in group])
              for g, group in enumerate(block_groups(config))}
    out["block_groups"] = {g: tree for g, tree in groups.items() if tree}
    return out


def unstack_blocks(params: dict, config: MMDiTConfig) -> dict:
    """The inverse of stack_blocks."""
    out = {k: v for k, v in params.items() if k != "block_groups"}
    stacked = params.get("block_groups", {})
    out["transformer_blocks"] = {
        i: jax.tree.map(lambda x, j=j: x[j], stacked[g])
        for g, group in enumerate(block_groups(config)) if g in stacked
        for j, i in enumerate(group)}
    return out


def tiny_config(
    image_size: int = 24,
    patch_size: int = 4,
    channels: int = 3,
    text_dim: int = 64,
    pooled_dim: int = 64,
    width: int = 128,
    depth: int = 4,
    heads: int = 4,
) -> MMDiTConfig:
    """A small pixel-space config for the toy world."""
    if width % heads:
        raise ValueError(f"width={width} must be divisible by heads={heads}.")
    return MMDiTConfig(
        sample_size=image_size,
        patch_size=patch_size,
        in_channels=channels,
        out_channels=channels,
        num_layers=depth,
        attention_head_dim=width // heads,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        caption_projection_dim=width,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=image_size // patch_size,
    )


def param_count(model: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param`` leaves) in ``model``."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------
# Helpers


def _linear(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    dtype: str,
    rngs: nnx.Rngs,
    zero: bool = False,
    use_bias: bool = True,
) -> nnx.Linear:
    # Xavier as in SD3/DiT; `zero` gives adaLN-Zero style identity-at-init.
    init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
    # eager_sharding=False: models must build without a mesh; the trainer
    # places parameters from the logical names.
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=jnp.dtype(dtype),
        kernel_init=nnx.with_partitioning(init, axes, eager_sharding=False),
        dot_general=matmul_2d,
        rngs=rngs,
    )


def matmul_2d(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
              preferred_element_type=None, out_sharding=None) -> jax.Array:
    """nnx.Linear's product ``lhs [..., K] @ rhs [K, N]`` as one 2-D matmul over the flattened
    leading axes. The same sums; but differentiated, the kernel's gradient is then a plain
    ``x^T @ dy``, where the batched form made XLA:CPU write a transposed copy of every
    activation gradient first (a third of the student's forward+backward on 2 CPU cores;
    docs/performance.md, "CPU round 3")."""
    ((contract, _), batch) = dimension_numbers
    if contract != (lhs.ndim - 1,) or batch != ((), ()) or rhs.ndim != 2 or out_sharding:
        raise ValueError(f"matmul_2d takes nnx.Linear's product only, not {dimension_numbers} "
                         f"(out_sharding {out_sharding})")
    y = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type)
    return y.reshape(*lhs.shape[:-1], rhs.shape[-1])


def _layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters, in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + _LN_EPS)


def timestep_embedding(t: jax.Array, dim: int = _TIME_PROJ_DIM) -> jax.Array:
    """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _sincos_2d(dim: int, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """2D sincos embeddings ``[P, dim]`` of points at (col, row), as diffusers': the first half
    encodes the column (x), the second the row (y)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def emb_1d(p: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", np.asarray(p, np.float64).reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([emb_1d(cols), emb_1d(rows)], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _sincos_grid(dim: int, max_size: int, base_size: int) -> np.ndarray:
    """diffusers ``get_2d_sincos_pos_embed`` as a ``[max, max, dim]`` grid (row-major)."""
    pos = np.arange(max_size, dtype=np.float64) / (max_size / base_size)
    cols, rows = np.meshgrid(pos, pos)
    return _sincos_2d(dim, cols, rows).reshape(max_size, max_size, dim)


@functools.lru_cache(maxsize=8)
def _coarse_positions(dim: int, max_size: int, base_size: int, top: int, left: int, gh: int,
                      gw: int, k: int) -> np.ndarray:
    """``[gh // k * gw // k, dim]``: the positions of the centres of the k x k blocks of a
    gh x gw patch grid cropped at (top, left) from _sincos_grid's grid, in its units."""
    scale = max_size / base_size
    cols, rows = np.meshgrid((left + k * np.arange(gw // k) + (k - 1) / 2) / scale,
                             (top + k * np.arange(gh // k) + (k - 1) / 2) / scale)
    return _sincos_2d(dim, cols, rows)


# ---------------------------------------------------------------------------
# Embeddings


class PatchEmbed(nnx.Module):
    """Patchify + Linear (== strided conv) + cropped fixed 2D sincos positions; with
    ``coarse_scale`` k, then one coarse token per k x k block (MMDiTConfig.coarse_scale)."""

    def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
        self.patch_size = config.patch_size
        self.coarse_scale = config.coarse_scale
        self.max_size = config.pos_embed_max_size
        self.base_size = config.sample_size // config.patch_size
        self.dim = config.inner_dim
        p = config.patch_size
        self.proj = _linear(
            p * p * config.in_channels, self.dim, (None, "embed"), dtype=config.dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        patches = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        tokens = self.proj(patches.reshape(b, gh * gw, p * p * c)).astype(jnp.float32)
        # Centre crop of the max-size grid, as diffusers' cropped_pos_embed.
        top, left = (self.max_size - gh) // 2, (self.max_size - gw) // 2
        grid = _sincos_grid(self.dim, self.max_size, self.base_size)
        pos = grid[top : top + gh, left : left + gw].reshape(gh * gw, self.dim)
        k = self.coarse_scale
        if not k:
            return tokens + jnp.asarray(pos)[None]
        blocks = tokens.reshape(b, gh // k, k, gw // k, k, self.dim).mean(axis=(2, 4))
        coarse_pos = _coarse_positions(self.dim, self.max_size, self.base_size, top, left, gh,
                                       gw, k)
        return jnp.concatenate([tokens + jnp.asarray(pos)[None],
                                blocks.reshape(b, -1, self.dim) + jnp.asarray(coarse_pos)[None]],
                               axis=1)


class _SiLUMLP(nnx.Module):
    """``linear_1 -> SiLU -> linear_2`` (TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_features: int, dim: int, *, dtype: str, rngs: nnx.Rngs):
        self.linear_1 = _linear(in_features, dim, (None, "embed"), dtype=dtype, rngs=rngs)
        self.linear_2 = _linear(dim, dim, ("embed", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(nnx.silu(self.linear_1(x))).astype(jnp.float32)


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
        dim = config.inner_dim
        self.timestep_embedder = _SiLUMLP(_TIME_PROJ_DIM, dim, dtype=config.dtype, rngs=rngs)
        self.text_embedder = _SiLUMLP(
            config.pooled_projection_dim, dim, dtype=config.dtype, rngs=rngs
        )

    def __call__(self, timesteps: jax.Array, pooled: jax.Array) -> jax.Array:
        """``timesteps`` [T, B] -> temb [B, T, D] (one MLP pass over all T*B)."""
        n, b = timesteps.shape
        t_emb = self.timestep_embedder(timestep_embedding(timesteps.reshape(-1)))
        t_emb = t_emb.reshape(n, b, -1).transpose(1, 0, 2)
        return t_emb + self.text_embedder(pooled)[:, None]


# ---------------------------------------------------------------------------
# Norms


class AdaLayerNormZero(nnx.Module):
    """SiLU -> Linear(n*D) modulation chunks; n=6 (SD3) or 9 (SD3.5 ZeroX)."""

    def __init__(self, dim: int, n_chunks: int, *, dtype: str, rngs: nnx.Rngs):
        self.n_chunks = n_chunks
        self.linear = _linear(
            dim, n_chunks * dim, ("embed", None), dtype=dtype, rngs=rngs, zero=True
        )

    def __call__(self, emb: jax.Array) -> list[jax.Array]:
        """``emb`` [B, S, D] -> n chunks of [B, S, 1, D] (broadcast over tokens)."""
        mod = self.linear(nnx.silu(emb)).astype(jnp.float32)
        return [m[:, :, None] for m in jnp.split(mod, self.n_chunks, axis=-1)]


class AdaLayerNormContinuous(nnx.Module):
    """Final-style norm: LN(x) * (1 + scale) + shift with (scale, shift) order."""

    def __init__(self, dim: int, *, dtype: str, rngs: nnx.Rngs):
        self.linear = _linear(dim, 2 * dim, ("embed", None), dtype=dtype, rngs=rngs, zero=True)

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        """``x`` [B, S, N, D], ``emb`` [B, S, D]."""
        scale, shift = jnp.split(self.linear(nnx.silu(emb)).astype(jnp.float32), 2, axis=-1)
        return _layer_norm(x) * (1 + scale[:, :, None]) + shift[:, :, None]


def _modulate(x_norm: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x_norm * (1 + scale) + shift


# ---------------------------------------------------------------------------
# Attention / MLP


class JointAttention(nnx.Module):
    """Multi-head attention over ``[context | image]``; context projections optional."""

    def __init__(
        self,
        config: MMDiTConfig,
        *,
        joint: bool,
        context_pre_only: bool,
        rngs: nnx.Rngs,
    ):
        dim, dt = config.inner_dim, config.dtype
        self.heads = config.num_attention_heads
        self.head_dim = config.attention_head_dim
        self.dtype = jnp.dtype(dt)
        self.implementation = config.attention
        self.to_q = _linear(dim, dim, ("embed", "heads"), dtype=dt, rngs=rngs)
        self.to_k = _linear(dim, dim, ("embed", "heads"), dtype=dt, rngs=rngs)
        self.to_v = _linear(dim, dim, ("embed", "heads"), dtype=dt, rngs=rngs)
        self.to_out = _linear(dim, dim, ("heads", "embed"), dtype=dt, rngs=rngs)
        self.norm_q = self._qk_norm(config, rngs)
        self.norm_k = self._qk_norm(config, rngs)
        if joint:
            self.add_q_proj = _linear(dim, dim, ("embed", "heads"), dtype=dt, rngs=rngs)
            self.add_k_proj = _linear(dim, dim, ("embed", "heads"), dtype=dt, rngs=rngs)
            self.add_v_proj = _linear(dim, dim, ("embed", "heads"), dtype=dt, rngs=rngs)
            self.norm_added_q = self._qk_norm(config, rngs)
            self.norm_added_k = self._qk_norm(config, rngs)
        # The last block's text stream ends after attention: no output projection.
        self.to_add_out = (
            _linear(dim, dim, ("heads", "embed"), dtype=dt, rngs=rngs)
            if joint and not context_pre_only
            else None
        )

    @staticmethod
    def _qk_norm(config: MMDiTConfig, rngs: nnx.Rngs) -> nnx.RMSNorm | None:
        if config.qk_norm is None:
            return None
        return nnx.RMSNorm(config.attention_head_dim, epsilon=_LN_EPS, dtype=jnp.float32, rngs=rngs)

    def _heads(self, proj: nnx.Linear, norm: nnx.RMSNorm | None, x: jax.Array) -> jax.Array:
        y = proj(x).reshape(*x.shape[:2], self.heads, self.head_dim)
        if norm is not None:
            y = norm(y.astype(jnp.float32))
        return y.astype(self.dtype)

    def __call__(
        self, x: jax.Array, c: jax.Array | None, key_mask: jax.Array
    ) -> tuple[jax.Array, jax.Array | None]:
        """``x`` [B, Nx, D], ``c`` [B, Nc, D] or None, ``key_mask`` [B, Nc + Nx] bool."""
        q = self._heads(self.to_q, self.norm_q, x)
        k = self._heads(self.to_k, self.norm_k, x)
        v = self._heads(self.to_v, None, x)
        n_ctx = 0
        if c is not None:
            n_ctx = c.shape[1]
            q = jnp.concatenate([self._heads(self.add_q_proj, self.norm_added_q, c), q], axis=1)
            k = jnp.concatenate([self._heads(self.add_k_proj, self.norm_added_k, c), k], axis=1)
            v = jnp.concatenate([self._heads(self.add_v_proj, None, c), v], axis=1)
        # XLA path: logits and softmax in float32 even for bf16 inputs.
        out = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :],
                                           implementation=self.implementation)
        out = out.reshape(*out.shape[:2], -1)
        x_out = self.to_out(out[:, n_ctx:]).astype(jnp.float32)
        if c is None or self.to_add_out is None:
            return x_out, None
        return x_out, self.to_add_out(out[:, :n_ctx]).astype(jnp.float32)


class FeedForward(nnx.Module):
    """``fc1 -> GELU(tanh) -> fc2`` with 4x hidden width."""

    def __init__(self, dim: int, *, dtype: str, rngs: nnx.Rngs):
        self.fc1 = _linear(dim, 4 * dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = _linear(4 * dim, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(nnx.gelu(self.fc1(x), approximate=True)).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Blocks


class JointTransformerBlock(nnx.Module):
    """SD3 joint block; image stream [B, S, N, D], context stream [B, 1, Lt, D]."""

    def __init__(
        self,
        config: MMDiTConfig,
        *,
        context_pre_only: bool,
        dual_attention: bool,
        rngs: nnx.Rngs,
    ):
        dim, dt = config.inner_dim, config.dtype
        self.norm1 = AdaLayerNormZero(dim, 9 if dual_attention else 6, dtype=dt, rngs=rngs)
        self.norm1_context: AdaLayerNormContinuous | AdaLayerNormZero
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(dim, dtype=dt, rngs=rngs)
        else:
            self.norm1_context = AdaLayerNormZero(dim, 6, dtype=dt, rngs=rngs)
        self.attn = JointAttention(config, joint=True, context_pre_only=context_pre_only, rngs=rngs)
        self.attn2 = (
            JointAttention(config, joint=False, context_pre_only=False, rngs=rngs)
            if dual_attention
            else None
        )
        self.ff = FeedForward(dim, dtype=dt, rngs=rngs)
        self.ff_context = None if context_pre_only else FeedForward(dim, dtype=dt, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        c: jax.Array,
        temb_x: jax.Array,
        temb_c: jax.Array,
        joint_mask: jax.Array,
        image_mask: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        b, s, n, d = x.shape
        mods = self.norm1(temb_x)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x_norm = _layer_norm(x)
        c_mods: list[jax.Array] = []
        if isinstance(self.norm1_context, AdaLayerNormContinuous):
            c_in = self.norm1_context(c, temb_c)
        else:
            c_mods = self.norm1_context(temb_c)
            c_in = _modulate(_layer_norm(c), c_mods[0], c_mods[1])

        attn_x, attn_c = self.attn(
            _modulate(x_norm, shift_msa, scale_msa).reshape(b, s * n, d),
            c_in.reshape(b, -1, d),
            joint_mask,
        )
        x = x + gate_msa * attn_x.reshape(b, s, n, d)
        if self.attn2 is not None:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x_in2 = _modulate(x_norm, shift_msa2, scale_msa2).reshape(b, s * n, d)
            attn2_x, _ = self.attn2(x_in2, None, image_mask)
            x = x + gate_msa2 * attn2_x.reshape(b, s, n, d)
        x = x + gate_mlp * self.ff(_modulate(_layer_norm(x), shift_mlp, scale_mlp))

        if attn_c is None or self.ff_context is None:  # context_pre_only: text stream ends
            return x, c
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
        c = c + c_gate_msa * attn_c.reshape(c.shape)
        c_ff = self.ff_context(_modulate(_layer_norm(c), c_shift_mlp, c_scale_mlp))
        return x, c + c_gate_mlp * c_ff


# ---------------------------------------------------------------------------
# Scanned layers


def _stacked(block, group: range, rngs: nnx.Rngs) -> JointTransformerBlock:
    """len(group) blocks of one kind as one module whose params have a leading layers axis."""
    @nnx.split_rngs(splits=len(group))
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> JointTransformerBlock:
        return block(group.start, rngs)

    return make(rngs)


def _scan(step, stacked: JointTransformerBlock, carry: tuple[jax.Array, jax.Array]):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def body(block: JointTransformerBlock, carry: tuple[jax.Array, jax.Array]):
        return step(block, *carry)

    return body(stacked, carry)


# ---------------------------------------------------------------------------
# Model


class MMDiT(nnx.Module):
    """SD3-style MMDiT predicting the flow-matching velocity.

    ``__call__(z, sigma, cond)``:
      * ``z`` [B, H, W, C] float32 noisy target (channels-last).
      * ``sigma`` [B] float32 in [0, 1] (1 = pure noise); the network sees
        ``1000 * sigma`` as in SD3.
      * ``cond``: ``"text"`` [B, Lt, joint_attention_dim], ``"text_mask"``
        [B, Lt] bool (True = real token), ``"pooled"``
        [B, pooled_projection_dim], and optionally ``"source"`` [B, H, W, C]
        with ``"has_source"`` [B] bool. Without ``"source"`` the sequence has
        no source slot (cheaper pure text-to-image); with it, rows whose
        ``has_source`` is False ignore the source exactly.
    Returns ``v`` [B, H, W, out_channels] float32.
    """

    def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dim, dt = config.inner_dim, config.dtype
        self.pos_embed = PatchEmbed(config, rngs=rngs)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(config, rngs=rngs)
        self.context_embedder = _linear(
            config.joint_attention_dim, dim, (None, "embed"), dtype=dt, rngs=rngs
        )
        # Zero so a text-to-image checkpoint is unchanged until edits train it.
        self.source_embed = nnx.Param(
            jnp.zeros((dim,), jnp.float32), out_sharding=("embed",), eager_sharding=False
        )
        def block(i: int, rngs: nnx.Rngs) -> JointTransformerBlock:
            return JointTransformerBlock(
                config,
                context_pre_only=i == config.num_layers - 1,
                dual_attention=i in config.dual_attention_layers,
                rngs=rngs,
            )

        if config.scan_layers:
            self.block_groups = nnx.List([_stacked(block, group, rngs)
                                          for group in block_groups(config)])
        else:
            self.transformer_blocks = nnx.List(
                [block(i, rngs) for i in range(config.num_layers)])
        self.norm_out = AdaLayerNormContinuous(dim, dtype=dt, rngs=rngs)
        p = config.patch_size
        self.proj_out = _linear(
            dim, p * p * config.out_channels, ("embed", None), dtype=dt, rngs=rngs, zero=True
        )

    def _check_inputs(self, z: jax.Array, sigma: jax.Array, cond: Mapping[str, jax.Array]) -> None:
        cfg = self.config
        missing = [k for k in _COND_KEYS if k not in cond]
        if missing:
            raise KeyError(f"cond is missing {missing}; provide keys {_COND_KEYS}.")
        if "source" in cond and "has_source" not in cond:
            raise KeyError("cond has 'source' but no 'has_source' [B] bool; add it.")
        if z.ndim != 4 or z.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"z has shape {z.shape}; expected [B, H, W, {cfg.in_channels}] (channels-last)."
            )
        h, w = z.shape[1:3]
        limit = cfg.pos_embed_max_size * cfg.patch_size
        if h % cfg.patch_size or w % cfg.patch_size or h > limit or w > limit:
            raise ValueError(
                f"image size {h}x{w} must be a multiple of patch_size={cfg.patch_size} "
                f"and at most {limit} (pos_embed_max_size*patch_size); resize the input."
            )
        block = cfg.patch_size * max(cfg.coarse_scale, 1)
        if h % block or w % block:
            raise ValueError(
                f"image size {h}x{w} must be a multiple of patch_size * coarse_scale = {block} "
                f"for coarse_scale={cfg.coarse_scale}; resize the input.")
        if sigma.shape != z.shape[:1]:
            raise ValueError(f"sigma has shape {sigma.shape}; expected [B]={z.shape[:1]}.")
        if "source" in cond and cond["source"].shape != z.shape:
            raise ValueError(
                f"cond['source'] has shape {cond['source'].shape}; expected z's {z.shape}."
            )

    def __call__(self, z: jax.Array, sigma: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
        self._check_inputs(z, sigma, cond)
        b, h, w, _ = z.shape
        p = self.config.patch_size
        target = self.pos_embed(z)
        n = target.shape[1]
        text_mask = cond["text_mask"].astype(bool)
        c = self.context_embedder(cond["text"]).astype(jnp.float32)[:, None]
        t = 1000.0 * sigma.astype(jnp.float32)
        if "source" in cond:
            source = self.pos_embed(cond["source"]) + self.source_embed[...]
            x = jnp.stack([source, target], axis=1)
            # Segment order [source, target]: source is modulated as clean (t = 0).
            temb_x = self.time_text_embed(jnp.stack([jnp.zeros_like(t), t]), cond["pooled"])
            source_keys = jnp.broadcast_to(cond["has_source"].astype(bool)[:, None], (b, n))
            image_mask = jnp.concatenate([source_keys, jnp.ones((b, n), bool)], axis=1)
        else:
            x = target[:, None]
            temb_x = self.time_text_embed(t[None], cond["pooled"])
            image_mask = jnp.ones((b, n), bool)
        temb = temb_x[:, -1:]
        joint_mask = jnp.concatenate([text_mask, image_mask], axis=1)

        def run_block(
            block: JointTransformerBlock, x: jax.Array, c: jax.Array
        ) -> tuple[jax.Array, jax.Array]:
            return block(x, c, temb_x, temb, joint_mask, image_mask)

        policy = REMAT_POLICIES[self.config.remat]
        step = run_block if policy is None else nnx.remat(run_block, policy=policy)
        if self.config.scan_layers:
            for group in self.block_groups:
                x, c = _scan(step, group, (x, c))
        else:
            for block in self.transformer_blocks:
                x, c = step(block, x, c)

        gh, gw = h // p, w // p
        patch_tokens = x[:, -1:, : gh * gw]  # the target's, without its coarse tokens
        out = self.proj_out(self.norm_out(patch_tokens, temb)[:, 0]).astype(jnp.float32)
        out = out.reshape(b, gh, gw, p, p, -1).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h, w, -1)


def forward_flops(config: MMDiTConfig, batch: int, image_tokens: int, text_tokens: int,
                  with_source: bool) -> int:
    """Matmul FLOPs of one forward (the contract's formula; tests/test_bench.py checks it
    against XLA's cost analysis of the compiled forward)."""
    d, b, t = config.inner_dim, batch, text_tokens
    segments = 2 if with_source else 1
    coarse = image_tokens // config.coarse_scale ** 2 if config.coarse_scale else 0
    n = (image_tokens + coarse) * segments  # every image token, source and coarse included
    patch = config.patch_size ** 2
    flops = 2 * b * image_tokens * segments * patch * config.in_channels * d  # patch embedding
    flops += 2 * b * t * config.joint_attention_dim * d  # context embedder
    flops += 2 * b * (segments * (_TIME_PROJ_DIM * d + d * d)  # timestep MLP per segment
                      + config.pooled_projection_dim * d + d * d)  # pooled-text MLP
    for i in range(config.num_layers):
        last = i == config.num_layers - 1
        dual = i in config.dual_attention_layers
        flops += 2 * b * segments * d * (9 if dual else 6) * d  # adaLN-Zero of the image
        flops += 2 * b * d * (2 if last else 6) * d  # the text stream's modulation
        flops += 2 * b * n * 4 * d * d  # q, k, v, out of the image tokens
        flops += 2 * b * t * (3 if last else 4) * d * d  # q, k, v (, out) of the text
        flops += 4 * b * (t + n) ** 2 * d  # joint attention: scores and values
        if dual:
            flops += 2 * b * n * 4 * d * d + 4 * b * n * n * d  # image-only attention
        flops += 2 * b * n * 8 * d * d  # image MLP (4x)
        if not last:
            flops += 2 * b * t * 8 * d * d  # text MLP
    flops += 2 * b * d * 2 * d  # final modulation
    flops += 2 * b * image_tokens * d * patch * config.out_channels  # output projection
    return flops


def example_cond(key: jax.Array, config: MMDiTConfig, batch: int,
                 text_tokens: int) -> dict[str, jax.Array]:
    """Random SD3-style conditions: token features, their mask and the pooled vector."""
    return {"text": 0.1 * jax.random.normal(key, (batch, text_tokens,
                                                  config.joint_attention_dim)),
            "text_mask": jnp.ones((batch, text_tokens), bool),
            "pooled": jnp.zeros((batch, config.pooled_projection_dim))}


def unscanned(config: MMDiTConfig, params: dict) -> tuple[MMDiTConfig, dict]:
    """(config, params) in the per-block layout diffusers uses (scanned layers unstacked);
    params may also be a LoRA tree, which mirrors them."""
    if not config.scan_layers:
        return config, params
    return replace(config, scan_layers=False), unstack_blocks(params, config)


_PREPARED = ("text", "pooled")  # per-row features of SD3's prepared data


def stacked(config: MMDiTConfig, params: dict, stack: Callable[[list[dict]], dict]) -> dict:
    """Per-block params (or a LoRA tree) in the layout ``config`` asks for."""
    return stack_blocks(params, config, stack=stack) if config.scan_layers else params


def precomputed(null: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]
                ) -> tuple[dict, dict]:
    """SD3's prepared conditions (``text``, ``pooled``) as the module reads them: every token
    is real (SD3 masks none)."""
    def text(entries: Mapping[str, jax.Array]) -> dict:
        return {"text": entries["text"], "pooled": entries["pooled"],
                "text_mask": jnp.ones(entries["text"].shape[:2], bool)}
    return text(batch), text(null)


def data_problems(config: MMDiTConfig, latent: tuple[int, ...],
                  features: Mapping[str, tuple[int, ...]]) -> list[str]:
    h, w, c = latent
    limit = config.pos_embed_max_size * config.patch_size
    problems = []
    if c != config.in_channels:
        problems.append(f"latents have {c} channels, the transformer takes {config.in_channels}")
    if h % config.patch_size or w % config.patch_size or max(h, w) > limit:
        problems.append(f"latents are {h}x{w}; the transformer needs multiples of "
                        f"patch_size={config.patch_size}, at most {limit}")
    if set(features) != set(_PREPARED):
        return [*problems, f"the rows carry {sorted(features)}, SD3 reads {list(_PREPARED)}"]
    if features["text"][1] != config.joint_attention_dim:
        problems.append(f"text features are {features['text'][1]} wide, the transformer's "
                        f"joint_attention_dim is {config.joint_attention_dim}")
    if features["pooled"][0] != config.pooled_projection_dim:
        problems.append(f"pooled text is {features['pooled'][0]} wide, the transformer's "
                        f"pooled_projection_dim is {config.pooled_projection_dim}")
    return problems

BACKBONE = Backbone(
    "mmdit", MMDiTConfig, MMDiT, forward_flops, example_cond, unscanned, DEFAULT_TARGETS,
    lambda: tiny_config(image_size=16, patch_size=2, channels=4, text_dim=24, pooled_dim=16,
                        width=64, depth=2, heads=2),
    stacked, precomputed, data_problems,
    references={"SD3.5-Medium": (sd35_medium_config, 333),  # 77 CLIP + 256 T5 tokens
                "MMDiT-6B": (mmdit_6b_config, 333)})

"""The decoder half of diffusers' ``AutoencoderKL`` (the SD3 / SD3.5 and Z-Image VAEs) in Flax
NNX: model-space latents -> images, so that a real-model run shows pictures without PyTorch.

Module names follow diffusers: ``post_quant_conv`` (when the config uses it) and ``decoder.
{conv_in, mid_block.{resnets[0], attentions[0], resnets[1]}, up_blocks[i].{resnets[j],
upsamplers[0].conv}, conv_norm_out, conv_out}``; a ResNet block holds ``norm1, conv1, norm2,
conv2`` and ``conv_shortcut`` when its width changes, the mid-block attention ``group_norm,
to_q, to_k, to_v, to_out[0]``. Arrays are channels-last ([B, H, W, C]); Conv ``kernel`` is
torch's ``weight`` as [kh, kw, in, out], Linear ``kernel`` the transposed ``weight``,
GroupNorm ``scale`` torch's ``weight``.

Latent convention (the pipelines' ``decode``): the transformer's latents ``z`` are
``(mean - shift_factor) * scaling_factor``; the VAE decodes ``z / scaling_factor +
shift_factor`` into images in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_EPS = 1e-6  # diffusers' Decoder fixes every norm's epsilon


@dataclass(frozen=True)
class VAEDecoderConfig:
    """The decoder's fields of diffusers' ``AutoencoderKL`` config (defaults: SD3's VAE)."""

    latent_channels: int = 16
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_post_quant_conv: bool = False
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    dtype: str = "float32"

    def __post_init__(self) -> None:
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if not self.block_out_channels or odd:
            raise ValueError(
                f"block_out_channels={self.block_out_channels} must be non-empty and divisible "
                f"by norm_num_groups={self.norm_num_groups} (GroupNorm); use the VAE's own "
                "config.json.")
        if self.scaling_factor == 0:
            raise ValueError("scaling_factor=0: latents are divided by it; use the VAE's "
                             "config.json value (SD3: 1.5305, Z-Image: 0.3611).")

    @property
    def upsample(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


def _conv(cin: int, cout: int, kernel: int, cfg: VAEDecoderConfig, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (kernel, kernel), padding=kernel // 2,
                    dtype=jnp.dtype(cfg.dtype), rngs=rngs)


def _norm(channels: int, cfg: VAEDecoderConfig, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Two-pass variance, as torch computes it: the one-pass form loses digits on large means.
    return nnx.GroupNorm(channels, cfg.norm_num_groups, epsilon=_EPS, dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEDecoderConfig, *, rngs: nnx.Rngs):
        self.norm1 = _norm(cin, cfg, rngs)
        self.conv1 = _conv(cin, cout, 3, cfg, rngs)
        self.norm2 = _norm(cout, cfg, rngs)
        self.conv2 = _conv(cout, cout, 3, cfg, rngs)
        self.conv_shortcut = _conv(cin, cout, 1, cfg, rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h).astype(jnp.float32)


class Attention(nnx.Module):
    """diffusers' single-head VAE attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, cfg: VAEDecoderConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.group_norm = _norm(channels, cfg, rngs)
        self.to_q, self.to_k, self.to_v = (nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
                                           for _ in range(3))
        self.to_out = nnx.List([nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, 1, c)
        q, k, v = (p(tokens) for p in (self.to_q, self.to_k, self.to_v))
        out = jax.nn.dot_product_attention(q, k, v).reshape(b, h, w, c)
        return x + self.to_out[0](out).astype(jnp.float32)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, cfg: VAEDecoderConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, cfg, rngs=rngs)
                                 for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, cfg, rngs=rngs)]
                                   if cfg.mid_block_add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, cfg: VAEDecoderConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # torch's nearest, scale 2
        return self.conv(x).astype(jnp.float32)


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, upsample: bool, cfg: VAEDecoderConfig, *,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, cfg, rngs=rngs)
                                 for i in range(cfg.layers_per_block + 1)])
        self.upsamplers = nnx.List([Upsample2D(cout, cfg, rngs=rngs)] if upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEDecoderConfig, *, rngs: nnx.Rngs):
        widths = cfg.block_out_channels[::-1]
        self.conv_in = _conv(cfg.latent_channels, widths[0], 3, cfg, rngs)
        self.mid_block = MidBlock(widths[0], cfg, rngs=rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(widths[max(i - 1, 0)], width, i < len(widths) - 1, cfg, rngs=rngs)
            for i, width in enumerate(widths)])
        self.conv_norm_out = _norm(widths[-1], cfg, rngs)
        self.conv_out = _conv(widths[-1], cfg.out_channels, 3, cfg, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z).astype(jnp.float32))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x))).astype(jnp.float32)


class VAEDecoder(nnx.Module):
    """``latents [B, h, w, C]`` (model space) -> ``images [B, h * f, w * f, 3]`` in [-1, 1],
    as the SD3 and Z-Image pipelines decode: ``vae.decode(z / scaling_factor + shift_factor)``.
    ``decode`` is ``AutoencoderKL.decode`` itself (no unscaling)."""

    def __init__(self, config: VAEDecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.post_quant_conv = (_conv(config.latent_channels, config.latent_channels, 1, config,
                                      rngs) if config.use_post_quant_conv else None)
        self.decoder = Decoder(config, rngs=rngs)

    def decode(self, z: jax.Array) -> jax.Array:
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"latents of shape {z.shape}: expected [B, h, w, "
                             f"{self.config.latent_channels}] (channels-last).")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, latents: jax.Array) -> jax.Array:
        cfg = self.config
        return self.decode(latents.astype(jnp.float32) / cfg.scaling_factor + cfg.shift_factor)


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """Images in [-1, 1] -> uint8 [..., 3], as diffusers' image processor post-processes them
    (clamped, then ``round(x * 255)``)."""
    unit = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.round(unit * 255).astype(np.uint8)

"""diffusers' ``AutoencoderKL`` (the SD3 / SD3.5 and Z-Image VAEs): its decoder converted to
our Flax ``VAEDecoder`` (no torch), and its encoder run in PyTorch for the prepare command.

Decoder key mapping (``to_ours`` / ``to_diffusers``): module names are diffusers' (digits are
list indices); Conv2d ``weight`` ``[out, in, kh, kw]`` <-> ``kernel`` ``[kh, kw, in, out]``;
Linear ``weight`` ``[out, in]`` <-> ``kernel`` ``[in, out]``; GroupNorm ``weight`` <->
``scale``; ``bias`` unchanged. ``encoder.*`` and ``quant_conv.*`` (the encoder half) are
skipped when the decoder loads.

Encoder (``VAEEncoder``, torch imported when it is built): the latent of an image is the mean
of the posterior (deterministic: a source image gets one latent however often it is prepared),
shifted and scaled as the SD3 and Z-Image pipelines do: ``(mean - shift_factor) *
scaling_factor`` with both factors from the VAE's config.json.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.interop._common import (
    ParamPath,
    assemble,
    iter_safetensors,
    kernel_from_weight,
    param_shapes,
    path_from_dotted,
    read_config,
    to_numpy,
)
from danceopd_jax.models.vae import VAEDecoder, VAEDecoderConfig, to_uint8

CLASS_NAME = "AutoencoderKL"
WEIGHTS_STEM = "diffusion_pytorch_model"
_ENCODER_HALF = ("encoder.", "quant_conv.")
_UP_BLOCK = "UpDecoderBlock2D"
_FIX = ("Fix: use the config.json that belongs to these weights and a diffusers AutoencoderKL "
        "folder (e.g. <pipeline>/vae).")


def config_from_diffusers(config: Mapping[str, Any]) -> VAEDecoderConfig:
    """diffusers ``AutoencoderKL`` ``config.json`` dict -> our ``VAEDecoderConfig`` (absent
    fields take diffusers' defaults; ``shift_factor: null`` means 0)."""
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise ValueError(f"config _class_name={name!r}: only diffusers' {CLASS_NAME} is "
                         "supported; pass the pipeline's vae folder.")
    blocks = tuple(config.get("block_out_channels", (64,)))
    up_types = tuple(config.get("up_block_types", (_UP_BLOCK,)))
    if up_types != (_UP_BLOCK,) * len(blocks):
        raise ValueError(f"up_block_types={list(up_types)}: the decoder supports one "
                         f"{_UP_BLOCK} per block_out_channels entry ({len(blocks)}).")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"act_fn={config['act_fn']!r}: the decoder supports 'silu' only.")
    return VAEDecoderConfig(
        latent_channels=config.get("latent_channels", 4),
        out_channels=config.get("out_channels", 3),
        block_out_channels=blocks,
        layers_per_block=config.get("layers_per_block", 1),
        norm_num_groups=config.get("norm_num_groups", 32),
        mid_block_add_attention=config.get("mid_block_add_attention", True),
        use_post_quant_conv=config.get("use_post_quant_conv", True),
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=float(config.get("shift_factor") or 0.0),
    )


def _is_conv(module: str) -> bool:
    kind = module.rpartition(".")[2]
    return "conv" in kind and "norm" not in kind


def our_path(name: str) -> ParamPath:
    """diffusers state-dict name -> our param path (names only)."""
    module, _, leaf = name.rpartition(".")
    if leaf == "weight":
        leaf = "scale" if "norm" in module.rpartition(".")[2] else "kernel"
    return path_from_dotted(module, leaf)


def to_ours(name: str, tensor: Any) -> tuple[ParamPath, np.ndarray]:
    """One diffusers state-dict entry -> (our param path, float32 array in our layout)."""
    path, array = our_path(name), to_numpy(tensor)
    if path[-1] != "kernel":
        return path, array
    if not _is_conv(name.rpartition(".")[0]):
        return path, kernel_from_weight(name, array)
    if array.ndim != 4:
        raise ValueError(f"{name}: a Conv2d weight must be 4-D, got shape {array.shape}")
    return path, array.transpose(2, 3, 1, 0)


def to_diffusers(path: ParamPath, array: Any) -> tuple[str, np.ndarray]:
    """One of our params -> (diffusers state-dict name, float32 array in its layout)."""
    *module, leaf = (str(p) for p in path)
    array = to_numpy(array)
    if leaf == "kernel":
        array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    return ".".join([*module, "weight" if leaf in ("kernel", "scale") else leaf]), array


def convert_state_dict(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    config: VAEDecoderConfig,
    what: str = "diffusers AutoencoderKL state dict",
) -> dict:
    """diffusers ``AutoencoderKL`` state dict (a mapping or ``(name, tensor)`` pairs; numpy or
    torch tensors) -> our ``VAEDecoder`` params (nested dict of float32 numpy); the encoder half
    is skipped. Raises ``ValueError`` naming every missing, unexpected or mis-shaped key."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return assemble(
        ((name, t) for name, t in items if not name.startswith(_ENCODER_HALF)),
        our_path, to_ours, to_diffusers,
        param_shapes(lambda rngs: VAEDecoder(config, rngs=rngs)), what, _FIX)


def load_vae_decoder(directory: str | os.PathLike) -> tuple[VAEDecoderConfig, dict]:
    """Read a diffusers AutoencoderKL folder (``config.json`` plus
    ``diffusion_pytorch_model.safetensors``, or sharded), one tensor at a time, without torch.

    Returns ``(config, params)`` for ``VAEDecoder(config, ...)``."""
    config = config_from_diffusers(read_config(directory))
    params = convert_state_dict(iter_safetensors(directory, WEIGHTS_STEM), config,
                                what=f"checkpoint {directory}")
    return config, params


class ImageDecoder:
    """Model-space latents [n, h, w, C] -> uint8 images [n, H, W, 3], by our Flax decoder
    converted from a diffusers AutoencoderKL folder; ``batch_size`` latents at a time (the last
    batch padded, so one program is compiled per latent shape)."""

    def __init__(self, directory: str | os.PathLike, batch_size: int = 1):
        self.config, params = load_vae_decoder(directory)
        graph, state = nnx.split(nnx.eval_shape(lambda: VAEDecoder(self.config,
                                                                   rngs=nnx.Rngs(0))))
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
        self._params, self.batch_size = state, batch_size
        self._decode = jax.jit(lambda p, z: nnx.merge(graph, p)(z))

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(latents), self.batch_size):
            chunk = np.asarray(latents[start:start + self.batch_size], np.float32)
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - len(chunk),
                                                      axis=0)])
            out.append(to_uint8(self._decode(self._params, padded))[:len(chunk)])
        return np.concatenate(out)


class VAEEncoder:
    """uint8 images [n, H, W, 3] -> float32 latents [n, H/f, W/f, C] (channels-last), by
    diffusers' AutoencoderKL in PyTorch."""

    def __init__(self, directory: str | os.PathLike, batch_size: int = 8):
        from diffusers import AutoencoderKL  # torch: for the prepare command only

        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise FileNotFoundError(f"{directory} has no config.json; pass a diffusers "
                                    "AutoencoderKL folder (e.g. <pipeline>/vae).")
        self.vae = AutoencoderKL.from_pretrained(directory).eval()
        config = self.vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.shift_factor or 0.0)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.batch_size = batch_size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.array(images[start:start + self.batch_size]))  # writable
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
                mean = self.vae.encode(x).latent_dist.mode()
                latents = (mean - self.shift_factor) * self.scaling_factor
                out.append(latents.permute(0, 2, 3, 1).float().numpy())
        return np.concatenate(out)

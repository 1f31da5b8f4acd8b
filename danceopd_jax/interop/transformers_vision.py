"""transformers ``Siglip2VisionModel`` -> our ``SiglipVisionModel`` (Z-Image omni's image
encoder), and ``SiglipImageEncoder``: source images -> SigLIP2 features as
``ZImageOmniPipeline.prepare_siglip_embeds`` computes them. Never imports torch.

Key mapping: names are transformers 5's (an older checkpoint's ``vision_model.`` prefix is
dropped); Linear ``weight`` ``[out, in]`` ->
``kernel`` ``[in, out]`` (``patch_embedding`` is a Linear over flattened patches), LayerNorm
``weight`` -> ``scale``, ``position_embedding.weight`` -> ``embedding``; ``bias`` unchanged.
The attention-pooling ``head.*`` is skipped (the pipeline reads ``last_hidden_state``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.interop._common import (
    ParamPath,
    assemble,
    iter_safetensors,
    linear_entry,
    param_shapes,
    path_from_dotted,
    read_config,
)
from danceopd_jax.interop.transformers_text import to_transformers
from danceopd_jax.models.vision.siglip import SiglipVisionConfig, SiglipVisionModel

WEIGHTS_STEM = "model"
_PREFIX = "vision_model."
_HEAD = ("head.", "vision_model.head.")
_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_channels", "num_patches", "patch_size", "hidden_act", "layer_norm_eps")
_FIX = ("Fix: use the config.json that belongs to these weights and a transformers "
        "Siglip2VisionModel checkpoint (e.g. <Z-Image omni pipeline>/siglip).")
ZIMAGE_SIGLIP_FOLDERS = ("siglip", "siglip_processor")


def config_from_transformers(config: Mapping[str, Any]) -> SiglipVisionConfig:
    """transformers ``Siglip2VisionConfig`` dict (or a ``Siglip2Config`` with a
    ``vision_config``) -> our ``SiglipVisionConfig``."""
    config = config.get("vision_config", config)
    missing = [k for k in _FIELDS if k not in config]
    if missing:
        raise ValueError(f"SigLIP2 vision config lacks {missing}; pass the config.json of a "
                         "transformers Siglip2VisionModel (model_type 'siglip2_vision_model').")
    return SiglipVisionConfig(**{k: config[k] for k in _FIELDS})


def our_path(name: str) -> ParamPath:
    """transformers state-dict name -> our param path (names only)."""
    module, _, leaf = name.removeprefix(_PREFIX).rpartition(".")
    if leaf == "weight":
        kind = module.rpartition(".")[2]
        leaf = ("embedding" if kind == "position_embedding" else
                "scale" if "layer_norm" in kind or kind == "post_layernorm" else "kernel")
    return path_from_dotted(module, leaf)


def to_ours(name: str, tensor: Any) -> tuple[ParamPath, np.ndarray]:
    return linear_entry(our_path(name), name, tensor)


def to_siglip(path: ParamPath, array: Any) -> tuple[str, np.ndarray]:
    return to_transformers(path, array, prefix="")


def convert_state_dict(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    config: SiglipVisionConfig,
    what: str = "transformers Siglip2VisionModel state dict",
) -> dict:
    """transformers ``Siglip2VisionModel`` state dict (a mapping or ``(name, tensor)`` pairs;
    numpy or torch tensors) -> our params (nested dict of float32 numpy), the pooling head
    skipped. Raises ``ValueError`` naming every missing, unexpected or mis-shaped key."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return assemble(
        ((name, t) for name, t in items if not name.startswith(_HEAD)),
        our_path, to_ours, to_siglip,
        param_shapes(lambda rngs: SiglipVisionModel(config, rngs=rngs)), what, _FIX)


def load_transformers_siglip(directory: str | os.PathLike) -> tuple[SiglipVisionConfig, dict]:
    """Read a transformers SigLIP2 vision folder (``config.json`` plus ``model.safetensors`` or
    its sharded index), one tensor at a time. Returns ``(config, params)``."""
    config = config_from_transformers(read_config(directory))
    params = convert_state_dict(iter_safetensors(directory, WEIGHTS_STEM), config,
                                what=f"checkpoint {directory}")
    return config, params


class SiglipImageEncoder:
    """uint8 images [n, H, W, 3] (one size) -> SigLIP2 features [n, h, w, hidden] float32, as
    ``ZImageOmniPipeline.prepare_siglip_embeds``: the folder's ``siglip_processor`` (resize to
    at most ``max_num_patches`` patches, [-1, 1], flattened patches) and our Flax tower
    converted from its ``siglip``; ``last_hidden_state``'s first h * w rows as an (h, w) grid."""

    def __init__(self, pipeline: str | os.PathLike, batch_size: int = 8):
        from transformers import AutoImageProcessor  # numpy / PIL processing only

        pipeline = Path(pipeline)
        missing = [sub for sub in ZIMAGE_SIGLIP_FOLDERS if not (pipeline / sub).is_dir()]
        if missing:
            raise FileNotFoundError(f"{pipeline} lacks {missing}; pass a diffusers "
                                    "ZImageOmniPipeline folder (it holds siglip and "
                                    "siglip_processor).")
        self.config, params = load_transformers_siglip(pipeline / "siglip")
        graph, state = nnx.split(nnx.eval_shape(
            lambda: SiglipVisionModel(self.config, rngs=nnx.Rngs(0))))
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
        self._params, self.batch_size = state, batch_size
        self._encode = jax.jit(lambda p, x, m, shape: nnx.merge(graph, p)(x, m, shape),
                               static_argnums=3)
        self.processor = AutoImageProcessor.from_pretrained(pipeline / "siglip_processor")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        from PIL import Image

        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [Image.fromarray(im) for im in images[start:start + self.batch_size]]
            inputs = self.processor(images=chunk, return_tensors="np")
            h, w = (int(s) for s in inputs["spatial_shapes"][0])
            hidden = self._encode(self._params, inputs["pixel_values"].astype(np.float32),
                                  inputs["pixel_attention_mask"].astype(bool), (h, w))
            out.append(np.asarray(hidden)[:, :h * w].reshape(len(chunk), h, w, -1))
        return np.concatenate(out)

"""The backbone contract: everything the layers above models/ know of a backbone family.

A backbone is a Flax NNX module built as ``module(config, rngs=nnx.Rngs)`` and called as
``(z, sigma, cond) -> v`` in our convention (METHOD.md 1: ``v = eps - x0``, ``sigma`` = 1 is
noise; a family with other conventions converts inside itself). ``cond`` holds the text
conditions the family reads (``example_cond`` shows which) and, for edits, ``source`` (clean
source latents) and ``has_source``. Its params carry logical axis names (``embed``, ``heads``,
``mlp``, ...) as sharding metadata, which train/mesh.py's rules place. Its config exposes the
size names the memory model reads (``inner_dim``, ``num_layers``, ``num_attention_heads``,
``patch_size``, ``in_channels``).

On prepared data (worlds/prepared.py) the text conditions arrive precomputed with every batch:
``precomputed`` turns a batch's rows and the prepared empty-prompt entries into the ``cond``
keys the module reads, and ``data_problems`` says why prepared data does not fit a config.

Each family's module defines one ``Backbone`` record (MMDiT in models/mmdit.py, Z-Image in
models/zimage.py), and models/backbones.py lists them; the PyTorch side of a family (its
diffusers config and key mapper) is its interop/ module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
from flax import nnx

Config = Any
Params = Any


@dataclass(frozen=True)
class Backbone:
    name: str
    config_type: type
    module: Callable[..., nnx.Module]  # module(config, rngs=nnx.Rngs(...))
    # (config, batch, image tokens per image, other tokens, with a source image) -> the matmul
    # FLOPs of one forward (2 per multiply-add; norms, activations, softmax left out).
    forward_flops: Callable[[Config, int, int, int, bool], int]
    # (key, config, batch, text tokens) -> random text conditions with the keys the module reads.
    example_cond: Callable[[jax.Array, Config, int, int], dict[str, jax.Array]]
    # (config, params or a LoRA tree that mirrors them) -> the per-layer layout diffusers uses.
    unscanned: Callable[[Config, Params], tuple[Config, Params]]
    lora_targets: str  # regex of the kernel paths a LoRA adapts by default
    tiny: Callable[[], Config]  # a few-thousand-parameter config (tests, CPU runs)
    # (config, per-layer params or a LoRA tree that mirrors them, stack) -> the layout the
    # config asks for (scanned layers joined by `stack`, e.g. lora.stack_layers for a LoRA).
    stacked: Callable[[Config, Params, Callable[[list], Any]], Params]
    # (the prepared empty-prompt entries, a batch of prepared rows) -> (the cond keys the module
    # reads, the empty prompt's text entries [1, ...], CFG's unconditional branch).
    precomputed: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[dict, dict]]
    # (config, latent shape [h, w, C], per-row feature shapes {name: shape}) -> what in prepared
    # data does not fit the config, in words (empty: it fits).
    data_problems: Callable[[Config, tuple[int, ...], Mapping[str, tuple[int, ...]]], list[str]]
    padding_tokens: int = 0  # tokens the module adds to every caption (template pieces)
    # Real models of the family: name -> (config factory (**overrides), non-image tokens).
    references: Mapping[str, tuple[Callable[..., Config], int]] = field(default_factory=dict)

"""Wiring: the backbone and text encoder as pure fields and a conditioner.

The algorithm (core/) sees only fields (params, z, sigma, cond) -> v. This module builds them
from Flax NNX modules: a module is split once into a static graph and a params pytree (plain
nested dicts, which optax and Orbax handle directly), and merged back inside the jitted step.

Two kinds of text conditioning: the shapes world runs its text encoder inside the step on
token ids ("text" params = the encoder's); prepared data carries precomputed conditions in
every batch ("text" params = the empty prompt's conditions, for CFG; Models.text is None, and
the backbone family's ``precomputed`` turns both into the keys its module reads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from danceopd_jax.models import lora
from danceopd_jax.models.mmdit import MMDiT, MMDiTConfig, tiny_config
from danceopd_jax.models.text.clip import CLIPTextEncoder, tiny_text_config

Params = Any


@dataclass(frozen=True)
class Models:
    """Static halves of the backbone and the text encoder, their parameters' logical axis
    names (train/mesh.py places parameters by them), plus the empty prompt's tokens.

    text / null_ids / null_mask are None for precomputed conditions (prepared data), which
    ``precomputed`` (the backbone family's, models/contract.py) turns into the module's cond."""

    backbone: nnx.GraphDef
    text: nnx.GraphDef | None
    backbone_axes: Params  # the params tree's structure, PartitionSpec leaves of logical names
    text_axes: Params
    null_ids: np.ndarray | None = None  # [1, L] int32: the empty prompt (CFG's unconditional)
    null_mask: np.ndarray | None = None  # [1, L] bool
    precomputed: Callable[[Params, dict], tuple[dict, dict]] | None = None
    lora_targets: str = lora.DEFAULT_TARGETS  # the backbone family's (models/contract.py)

    def trainable_axes(self, trainable: Params) -> Params:
        """Logical axes of a trainable tree: {"backbone"[, "text"]} or {"lora", "full"}."""
        def axes(kind: str, tree: Params) -> Params:
            match kind:
                case "lora":
                    return lora.axes(self.backbone_axes, tree)
                case "full":  # base params a LoRA student trains in full
                    return lora.pick(self.backbone_axes, tree)
                case "text":
                    return self.text_axes
            return self.backbone_axes
        return {k: axes(k, v) for k, v in trainable.items()}

    def params_axes(self, params: Params) -> Params:
        """Logical axes of a frozen backbone's params: plain, or a LoRA teacher's
        ``lora.adapted`` params."""
        if lora.is_adapted(params):
            return lora.adapted_axes(self.backbone_axes, params)
        return self.backbone_axes

    def field(self) -> Callable:
        """The backbone as a field; params may be ``lora.adapted`` (merged here, per call)."""
        def velocity(params: Params, z: jax.Array, sigma: jax.Array, cond: dict) -> jax.Array:
            return nnx.merge(self.backbone, lora.resolve(params))(z, sigma, cond)
        return velocity

    def encode_text(self, text_params: Params, input_ids: jax.Array,
                    attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        return nnx.merge(self.text, text_params)(input_ids, attention_mask)

    def conditioner(self, prompt_dropout: float = 0.0):
        """(params with a "text" entry, batch, key) -> cond, with the empty prompt under "null".

        prompt_dropout replaces a sample's prompt by the empty one (teacher training, so CFG
        has an unconditional model to work with)."""
        def condition(params: Params, batch: dict, key: jax.Array) -> dict:
            text, null = self._text(params["text"], batch)
            if prompt_dropout > 0:
                drop = jax.random.bernoulli(key, prompt_dropout, (text["text"].shape[0],))
                text = {k: jnp.where(drop.reshape(-1, *[1] * (v.ndim - 1)), null[k], v)
                        for k, v in text.items()}
            source = {k: batch[k] for k in ("source", "has_source") if k in batch}
            return {**text, **source, "null": null}
        return condition

    def _text(self, text_params: Params, batch: dict) -> tuple[dict, dict]:
        """The batch's text conditions and the empty prompt's ([1, ...]): {"text",
        "text_mask", "pooled"}, or the keys the backbone's ``precomputed`` gives."""
        if self.text is None:  # precomputed: the batch has them, text_params is the null
            return self.precomputed(text_params, batch)
        tokens, pooled = self.encode_text(text_params, batch["input_ids"],
                                          batch["attention_mask"])
        null_tokens, null_pooled = self.encode_text(text_params, self.null_ids, self.null_mask)
        return ({"text": tokens, "text_mask": batch["attention_mask"], "pooled": pooled},
                {"text": null_tokens, "text_mask": jnp.asarray(self.null_mask),
                 "pooled": null_pooled})


def init_models(config: ml_collections.ConfigDict, vocab_size: int, eos_token_id: int,
                null_ids: np.ndarray, null_mask: np.ndarray,
                seed: int) -> tuple[Models, Params, Params]:
    """Build the world's tiny MMDiT and text encoder from config.model, freshly initialised."""
    m = config.model
    text_cfg = tiny_text_config(vocab_size=vocab_size, max_len=null_ids.shape[1],
                                hidden=m.text_width, layers=m.text_layers, heads=m.text_heads,
                                projection_dim=m.text_width, eos_token_id=eos_token_id,
                                causal=not m.get("text_bidirectional", False))
    rngs = nnx.Rngs(seed)
    backbone_graph, backbone_params, backbone_axes = _split(MMDiT(shapes_backbone(config),
                                                                  rngs=rngs))
    text_graph, text_params, text_axes = _split(CLIPTextEncoder(text_cfg, rngs=rngs))
    models = Models(backbone_graph, text_graph, backbone_axes, text_axes,
                    np.asarray(null_ids, np.int32), np.asarray(null_mask, bool))
    return models, backbone_params, text_params


def shapes_backbone(config: ml_collections.ConfigDict) -> MMDiTConfig:
    """The shapes world's backbone: a small MMDiT of config.model's sizes."""
    m = config.model
    backbone = tiny_config(image_size=config.world.image_size, patch_size=m.patch_size,
                           text_dim=m.text_width, pooled_dim=m.text_width, width=m.width,
                           depth=m.depth, heads=m.heads)
    return replace(backbone, dtype=m.dtype, remat=m.remat,
                   coarse_scale=m.get("coarse_scale", 0))


def _split(module: nnx.Module) -> tuple[nnx.GraphDef, Params, Params]:
    """(static graph, params as plain dicts, the params' logical axis names)."""
    graph, state = nnx.split(module)
    return graph, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def count(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


"""transformers text encoders -> ours: ``CLIPTextModelWithProjection`` -> ``CLIPTextEncoder``
and ``T5EncoderModel`` -> ``T5Encoder``.

Our module names are transformers' (for CLIP with the ``text_model.`` prefix dropped;
``text_projection`` has none). Linear ``weight`` ``[out, in]`` -> ``kernel`` ``[in, out]``
(transposed); (RMS) LayerNorm ``weight`` -> ``scale``; Embedding ``weight`` -> ``embedding``
(unchanged ``[num, features]``); ``bias`` unchanged. Skipped: CLIP's
``text_model.embeddings.position_ids`` (an ``arange`` buffer that older checkpoints store) and
T5's ``encoder.embed_tokens.weight`` when ``shared.weight`` is present (transformers ties the
former to the latter; a checkpoint holding only the former loads it as ``shared``).

Our CLIP encoder returns transformers' ``(last_hidden_state, text_embeds)``, our T5 encoder
its ``last_hidden_state``. ``SD3PromptEncoder`` loads all three encoders and their tokenizers from
a diffusers SD3 pipeline folder and turns prompts into SD3's conditions.

Qwen3 (``Qwen3Model``, Z-Image's ``text_encoder``): the same layout rules, with RMSNorm
``weight`` (``*norm``, ``*layernorm``) -> ``scale`` and ``embed_tokens.weight`` ->
``embedding``; a ``Qwen3ForCausalLM`` checkpoint loads too (its ``model.`` prefix is dropped,
its ``lm_head`` skipped). ``ZImagePromptEncoder`` turns prompts into Z-Image's features.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
    to_numpy,
)
from danceopd_jax.models.text.clip import CLIPTextConfig, CLIPTextEncoder
from danceopd_jax.models.text.qwen3 import Qwen3Config, Qwen3Model
from danceopd_jax.models.text.sd3 import SD3TextEncoders
from danceopd_jax.models.text.t5 import T5Config, T5Encoder

WEIGHTS_STEM = "model"
_PREFIX = "text_model."
_TOP_LEVEL = "text_projection"
_POSITION_IDS = "text_model.embeddings.position_ids"
_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "projection_dim", "hidden_act", "layer_norm_eps", "eos_token_id",
)
_LEGACY_EOS = 2
_EMBEDDINGS = ("shared", "relative_attention_bias")  # Embedding modules not named *_embedding
_FIX = (
    "Fix: use the config.json that belongs to these weights and a transformers "
    "CLIPTextModelWithProjection checkpoint (e.g. <pipeline>/text_encoder)."
)
_T5_SHARED = "shared.weight"
_T5_TIED = "encoder.embed_tokens.weight"
_T5_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
    "feed_forward_proj",
)
_QWEN3_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
)
_QWEN3_PREFIX = "model."
_QWEN3_SKIPPED = ("lm_head.weight", "rotary_emb.inv_freq")
_QWEN3_FIX = (
    "Fix: use the config.json that belongs to these weights and a transformers Qwen3Model "
    "checkpoint (e.g. <Z-Image pipeline>/text_encoder)."
)
_T5_FIX = (
    "Fix: use the config.json that belongs to these weights and a transformers T5EncoderModel "
    "checkpoint (e.g. <pipeline>/text_encoder_3)."
)


def config_from_transformers(config: Mapping[str, Any]) -> CLIPTextConfig:
    """transformers ``CLIPTextConfig`` dict (``config.json``) -> our ``CLIPTextConfig``.

    Legacy configs say ``eos_token_id=2``, for which transformers pools at the highest token
    id; that is the EOS token, the last vocabulary id, in CLIP's tokenizer, so it becomes
    ``vocab_size - 1``.
    """
    missing = [k for k in _FIELDS if k not in config]
    if missing:
        raise ValueError(
            f"CLIP text config lacks {missing}; pass the config.json of a transformers "
            "CLIPTextModelWithProjection (model_type 'clip_text_model')."
        )
    fields = {k: config[k] for k in _FIELDS}
    if fields["eos_token_id"] == _LEGACY_EOS:
        fields["eos_token_id"] = fields["vocab_size"] - 1
    return CLIPTextConfig(**fields)


def t5_config_from_transformers(config: Mapping[str, Any]) -> T5Config:
    """transformers ``T5Config`` dict (``config.json``) -> our ``T5Config``."""
    missing = [k for k in _T5_FIELDS if k not in config]
    if missing:
        raise ValueError(
            f"T5 config lacks {missing}; pass the config.json of a transformers T5EncoderModel "
            "(model_type 't5')."
        )
    return T5Config(**{k: config[k] for k in _T5_FIELDS})


def our_path(name: str) -> ParamPath:
    """transformers state-dict name (CLIP or T5) -> our param path (names only)."""
    module, _, leaf = name.removeprefix(_PREFIX).rpartition(".")
    kind = module.rpartition(".")[2]
    if leaf == "weight":
        if "layer_norm" in kind:
            leaf = "scale"
        elif kind.endswith("_embedding") or kind in _EMBEDDINGS:
            leaf = "embedding"
        else:
            leaf = "kernel"
    return path_from_dotted(module, leaf)


def to_ours(name: str, tensor: Any) -> tuple[ParamPath, np.ndarray]:
    """One transformers state-dict entry -> (our param path, float32 array in our layout)."""
    return linear_entry(our_path(name), name, tensor)


def to_transformers(
    path: ParamPath, array: Any, prefix: str = _PREFIX
) -> tuple[str, np.ndarray]:
    """One of our params -> (transformers state-dict name, float32 array in its layout).

    ``prefix`` is CLIP's ``text_model.``; T5 names have none (``prefix=""``).
    """
    *module_parts, leaf = (str(p) for p in path)
    array = to_numpy(array)
    prefix = "" if path[0] == _TOP_LEVEL else prefix
    weight = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
    return f"{prefix}{'.'.join(module_parts)}.{weight}", array.T if leaf == "kernel" else array


def convert_state_dict(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    config: CLIPTextConfig,
    what: str = "transformers CLIPTextModelWithProjection state dict",
) -> dict:
    """transformers state dict (a mapping or ``(name, tensor)`` pairs; numpy or torch tensors)
    -> our params (nested dict of float32 numpy).

    Raises ``ValueError`` naming every missing, unexpected or mis-shaped key.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return assemble(
        ((name, t) for name, t in items if name != _POSITION_IDS),
        our_path,
        to_ours,
        to_transformers,
        param_shapes(lambda rngs: CLIPTextEncoder(config, rngs=rngs)),
        what,
        _FIX,
    )


def load_transformers_clip(directory: str | os.PathLike) -> tuple[CLIPTextConfig, dict]:
    """Read a transformers CLIP text folder (``config.json`` plus ``model.safetensors`` or its
    sharded ``.index.json``), one shard and one tensor at a time; never imports torch.

    Returns ``(config, params)`` for ``CLIPTextEncoder(config, ...)``.
    """
    config = config_from_transformers(read_config(directory))
    params = convert_state_dict(
        iter_safetensors(directory, WEIGHTS_STEM), config, what=f"checkpoint {directory}"
    )
    return config, params


def _t5_path(name: str) -> ParamPath:
    return our_path(_T5_SHARED if name == _T5_TIED else name)


def _t5_to_ours(name: str, tensor: Any) -> tuple[ParamPath, np.ndarray]:
    return to_ours(_T5_SHARED if name == _T5_TIED else name, tensor)


def _t5_to_transformers(path: ParamPath, array: Any) -> tuple[str, np.ndarray]:
    return to_transformers(path, array, prefix="")


def _untie(items: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """transformers' tie, streamed: ``encoder.embed_tokens.weight`` also maps to ``shared``; it
    is dropped after ``shared.weight``, and overwritten by a ``shared.weight`` that follows."""
    seen_shared = False
    for name, tensor in items:
        seen_shared |= name == _T5_SHARED
        if not (seen_shared and name == _T5_TIED):
            yield name, tensor


def convert_t5_state_dict(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    config: T5Config,
    what: str = "transformers T5EncoderModel state dict",
) -> dict:
    """transformers ``T5EncoderModel`` state dict (a mapping or ``(name, tensor)`` pairs; numpy
    or torch tensors) -> our ``T5Encoder`` params (nested dict of float32 numpy).

    Raises ``ValueError`` naming every missing, unexpected or mis-shaped key.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return assemble(
        _untie(items),
        _t5_path,
        _t5_to_ours,
        _t5_to_transformers,
        param_shapes(lambda rngs: T5Encoder(config, rngs=rngs)),
        what,
        _T5_FIX,
    )


def load_transformers_t5(directory: str | os.PathLike) -> tuple[T5Config, dict]:
    """Read a transformers T5 encoder folder (``config.json`` plus ``model.safetensors`` or its
    sharded ``.index.json``, as SD3's ``text_encoder_3``), one shard and one tensor at a time;
    never imports torch.

    Returns ``(config, params)`` for ``T5Encoder(config, ...)``.
    """
    config = t5_config_from_transformers(read_config(directory))
    params = convert_t5_state_dict(
        iter_safetensors(directory, WEIGHTS_STEM), config, what=f"checkpoint {directory}"
    )
    return config, params


# A diffusers StableDiffusion3Pipeline folder: (encoder, tokenizer) subfolders, in the order
# SD3TextEncoders takes them (CLIP-L, CLIP-G with projection, T5).
SD3_TEXT_FOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),
                    ("text_encoder_3", "tokenizer_3"))


class SD3PromptEncoder:
    """Prompts -> SD3's ``(text [n, Lc + Lt, D], pooled [n, P])`` as float32 numpy, as diffusers'
    ``StableDiffusion3Pipeline.encode_prompt`` computes ``(prompt_embeds, pooled_prompt_embeds)``:
    our Flax encoders, converted from a diffusers SD3 pipeline folder's ``text_encoder``,
    ``text_encoder_2`` and ``text_encoder_3``, and transformers' tokenizers from its
    ``tokenizer``, ``tokenizer_2`` and ``tokenizer_3`` (CLIP padded to the tokenizer's
    ``model_max_length``, T5 to ``max_sequence_length``).

    Batches of ``batch_size`` (the last one padded), so one program is compiled.
    """

    def __init__(self, pipeline: str | os.PathLike, max_sequence_length: int = 256,
                 batch_size: int = 16):
        from transformers import AutoTokenizer  # tokenizers only (no torch)

        pipeline = Path(pipeline)
        missing = [sub for pair in SD3_TEXT_FOLDERS for sub in pair
                   if not (pipeline / sub).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{pipeline} lacks {missing}; pass a diffusers StableDiffusion3Pipeline folder "
                "(it holds text_encoder, text_encoder_2, text_encoder_3 and tokenizer, "
                "tokenizer_2, tokenizer_3).")
        (l_cfg, l_params), (g_cfg, g_params), (t_cfg, t_params) = (
            load_transformers_clip(pipeline / "text_encoder"),
            load_transformers_clip(pipeline / "text_encoder_2"),
            load_transformers_t5(pipeline / "text_encoder_3"))

        def build() -> SD3TextEncoders:
            rngs = nnx.Rngs(0)
            return SD3TextEncoders(CLIPTextEncoder(l_cfg, rngs=rngs),
                                   CLIPTextEncoder(g_cfg, rngs=rngs), T5Encoder(t_cfg, rngs=rngs))

        graph, state = nnx.split(nnx.eval_shape(build))
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, {
            "clip_l": l_params, "clip_g": g_params, "t5": t_params}))
        self._params = state
        self._encode = jax.jit(lambda params, *ids: nnx.merge(graph, params)(*ids))
        self.tokenizers = [AutoTokenizer.from_pretrained(pipeline / tok)
                           for _, tok in SD3_TEXT_FOLDERS]
        self.lengths = [self.tokenizers[0].model_max_length,
                        self.tokenizers[1].model_max_length, max_sequence_length]
        for (sub, _), cfg, length in zip(SD3_TEXT_FOLDERS[:2], (l_cfg, g_cfg), self.lengths[:2],
                                         strict=True):
            if length > cfg.max_position_embeddings:
                raise ValueError(
                    f"{pipeline / sub}: its tokenizer pads to {length} tokens but the encoder "
                    f"has {cfg.max_position_embeddings} positions; pair each encoder with its "
                    "own tokenizer.")
        self.batch_size = batch_size

    def _ids(self, prompts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(tok(list(prompts), padding="max_length", max_length=length,
                               truncation=True)["input_ids"], np.int32)
                for tok, length in zip(self.tokenizers, self.lengths, strict=True)]

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        texts, pooled = [], []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start:start + self.batch_size])
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
            cond = self._encode(self._params, *self._ids(padded))
            texts.append(np.asarray(cond["text"])[:len(chunk)])
            pooled.append(np.asarray(cond["pooled"])[:len(chunk)])
        return np.concatenate(texts), np.concatenate(pooled)


# --------------------------------------------------------------------------- Qwen3


def qwen3_config_from_transformers(config: Mapping[str, Any]) -> Qwen3Config:
    """transformers ``Qwen3Config`` dict (``config.json``) -> our ``Qwen3Config``. The rotary
    base is ``rope_parameters.rope_theta`` (transformers 5) or ``rope_theta`` (older files);
    only the default RoPE and full attention are supported."""
    missing = [k for k in _QWEN3_FIELDS if k not in config]
    if missing:
        raise ValueError(f"Qwen3 config lacks {missing}; pass the config.json of a transformers "
                         "Qwen3Model (model_type 'qwen3').")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope type {rope['rope_type']!r} is unsupported; Qwen3's text "
                         "encoder uses the default RoPE.")
    if config.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is unsupported; Z-Image's Qwen3 attends to "
                         "the whole prompt.")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r} is unsupported; Qwen3 uses silu.")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ValueError("Qwen3 config has neither rope_parameters.rope_theta nor rope_theta.")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return Qwen3Config(**{k: config[k] for k in _QWEN3_FIELDS}, head_dim=head_dim,
                       rope_theta=float(theta),
                       attention_bias=bool(config.get("attention_bias", False)))


def _qwen3_path(name: str) -> ParamPath:
    module, _, leaf = name.removeprefix(_QWEN3_PREFIX).rpartition(".")
    if leaf == "weight":
        kind = module.rpartition(".")[2]
        leaf = ("scale" if kind.endswith("norm") else
                "embedding" if kind == "embed_tokens" else "kernel")
    return path_from_dotted(module, leaf)


def _qwen3_to_ours(name: str, tensor: Any) -> tuple[ParamPath, np.ndarray]:
    return linear_entry(_qwen3_path(name), name, tensor)


def _qwen3_to_transformers(path: ParamPath, array: Any) -> tuple[str, np.ndarray]:
    return to_transformers(path, array, prefix="")


def convert_qwen3_state_dict(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    config: Qwen3Config,
    what: str = "transformers Qwen3Model state dict",
) -> dict:
    """transformers ``Qwen3Model`` (or ``Qwen3ForCausalLM``) state dict (a mapping or ``(name,
    tensor)`` pairs; numpy or torch tensors) -> our ``Qwen3Model`` params (nested dict of
    float32 numpy). Raises ``ValueError`` naming every missing, unexpected or mis-shaped key."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return assemble(
        ((name, t) for name, t in items if name not in _QWEN3_SKIPPED),
        _qwen3_path, _qwen3_to_ours, _qwen3_to_transformers,
        param_shapes(lambda rngs: Qwen3Model(config, rngs=rngs)), what, _QWEN3_FIX)


def load_transformers_qwen3(directory: str | os.PathLike) -> tuple[Qwen3Config, dict]:
    """Read a transformers Qwen3 folder (``config.json`` plus ``model.safetensors`` or its
    sharded ``.index.json``, as Z-Image's ``text_encoder``), one tensor at a time; never imports
    torch. Returns ``(config, params)`` for ``Qwen3Model(config, ...)``."""
    config = qwen3_config_from_transformers(read_config(directory))
    params = convert_qwen3_state_dict(iter_safetensors(directory, WEIGHTS_STEM), config,
                                      what=f"checkpoint {directory}")
    return config, params


# Z-Image's prompt features: hidden_states[-2] of its Qwen3, at the tokenizer's real tokens.
ZIMAGE_TEXT_LAYER = -2
ZIMAGE_TEXT_FOLDERS = ("text_encoder", "tokenizer")


def zimage_prompt_segments(prompt: str, num_condition_images: int) -> list[str]:
    """The omni pipeline's text segments of one prompt (``ZImageOmniPipeline._encode_prompt``):
    one chat turn without images; with n condition images, the turn is cut at each image's
    place (``<|vision_start|>`` ... ``<|vision_end|>``) and every piece is encoded on its own."""
    tail = "<|im_end|>\n<|im_start|>assistant\n"
    if num_condition_images == 0:
        return ["<|im_start|>user\n" + prompt + tail]
    return (["<|im_start|>user\n<|vision_start|>"]
            + ["<|vision_end|><|vision_start|>"] * (num_condition_images - 1)
            + ["<|vision_end|>" + prompt + tail + "<|vision_start|>", "<|vision_end|><|im_end|>"])


class ZImagePromptEncoder:
    """Prompts -> Z-Image's text features as its pipelines compute them, by our Flax Qwen3
    converted from a Z-Image pipeline folder's ``text_encoder`` and transformers' tokenizer
    from its ``tokenizer`` (no torch).

    ``__call__(prompts)`` follows ``ZImagePipeline._encode_prompt``: the tokenizer's chat
    template (one user turn, generation prompt, ``enable_thinking=True``); with
    ``num_condition_images > 0``, ``ZImageOmniPipeline._encode_prompt``'s segments. Each text
    is padded to ``max_sequence_length`` (truncated beyond) and run through the Qwen3 with its
    attention mask; the features are ``hidden_states[-2]``. Returns ``(features [n, s, L, D],
    mask [n, s, L])`` float32 / bool with s segments per prompt (1 without images): the
    pipelines keep ``features[i, j][mask[i, j]]``, i.e. drop the padding.
    """

    def __init__(self, pipeline: str | os.PathLike, max_sequence_length: int = 512,
                 batch_size: int = 16):
        from transformers import AutoTokenizer  # tokenizers only (no torch)

        pipeline = Path(pipeline)
        missing = [sub for sub in ZIMAGE_TEXT_FOLDERS if not (pipeline / sub).is_dir()]
        if missing:
            raise FileNotFoundError(f"{pipeline} lacks {missing}; pass a diffusers Z-Image "
                                    "pipeline folder (it holds text_encoder and tokenizer).")
        config, params = load_transformers_qwen3(pipeline / "text_encoder")
        graph, state = nnx.split(nnx.eval_shape(lambda: Qwen3Model(config, rngs=nnx.Rngs(0))))
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
        self._params, self.config = state, config
        self._encode = jax.jit(lambda p, ids, mask: nnx.merge(graph, p)(
            ids, mask, output_hidden_layer=ZIMAGE_TEXT_LAYER))
        self.tokenizer = AutoTokenizer.from_pretrained(pipeline / "tokenizer")
        self.max_sequence_length, self.batch_size = max_sequence_length, batch_size

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Already-templated texts -> (features [n, L, D], mask [n, L])."""
        features, masks = [], []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
            tokens = self.tokenizer(padded, padding="max_length",
                                    max_length=self.max_sequence_length, truncation=True)
            ids = np.asarray(tokens["input_ids"], np.int32)
            mask = np.asarray(tokens["attention_mask"], bool)
            features.append(np.asarray(self._encode(self._params, ids, mask))[:len(chunk)])
            masks.append(mask[:len(chunk)])
        return np.concatenate(features), np.concatenate(masks)

    def __call__(self, prompts: Sequence[str], num_condition_images: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
        if num_condition_images == 0:
            texts = [[self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                enable_thinking=True)] for p in prompts]
        else:
            texts = [zimage_prompt_segments(p, num_condition_images) for p in prompts]
        features, mask = self.encode([t for segments in texts for t in segments])
        n, s = len(prompts), len(texts[0])
        return features.reshape(n, s, *features.shape[1:]), mask.reshape(n, s, -1)

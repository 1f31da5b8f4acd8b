"""SD3's conditioning from its three text encoders (diffusers ``StableDiffusion3Pipeline``).

``encode_prompt`` there: CLIP-L's and CLIP-G's penultimate hidden states (``hidden_states[-2]``,
no final LayerNorm; ``clip_skip=k`` takes ``hidden_states[-(k + 2)]``) are concatenated along
features, zero-padded to the T5 width and put before the T5 tokens along the sequence; the
pooled vector is concat(CLIP-L ``text_embeds``, CLIP-G ``text_embeds``), i.e. each projection
model's final-LayerNorm'd hidden state at its first EOS, projected. No encoder gets an
attention mask (CLIP stays causal; T5 attends to its padding) and the transformer gets none
either, so ``text_mask`` is all True.

Without T5 (``text_encoder_3=None``) diffusers uses zeros [B, max_sequence_length,
joint_attention_dim] as the T5 tokens: pass those to ``sd3_conditions``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from danceopd_jax.models.text.clip import CLIPTextEncoder
from danceopd_jax.models.text.t5 import T5Encoder


def sd3_conditions(
    clip_l: tuple[jax.Array, jax.Array],
    clip_g: tuple[jax.Array, jax.Array],
    t5_tokens: jax.Array,
) -> dict[str, jax.Array]:
    """Combine ``(tokens [B, Lc, Dl], pooled [B, Pl])`` of CLIP-L, the same of CLIP-G
    (``tokens`` from the penultimate layer) and T5's ``[B, Lt, Dt]`` into the MMDiT's ``cond``:
    ``"text"`` [B, Lc + Lt, Dt], ``"text_mask"`` [B, Lc + Lt] (all True), ``"pooled"``
    [B, Pl + Pg]."""
    (l_tokens, l_pooled), (g_tokens, g_pooled) = clip_l, clip_g
    clip_tokens = jnp.concatenate([l_tokens, g_tokens], axis=-1)
    pad = t5_tokens.shape[-1] - clip_tokens.shape[-1]
    if pad < 0:
        raise ValueError(
            f"CLIP-L + CLIP-G width {clip_tokens.shape[-1]} exceeds the T5 width "
            f"{t5_tokens.shape[-1]}; SD3 pads the CLIP features up to T5's d_model, so pair the "
            "encoders of one pipeline."
        )
    clip_tokens = jnp.pad(clip_tokens, ((0, 0), (0, 0), (0, pad)))
    text = jnp.concatenate([clip_tokens, t5_tokens], axis=1)
    return {
        "text": text,
        "text_mask": jnp.ones(text.shape[:2], bool),
        "pooled": jnp.concatenate([l_pooled, g_pooled], axis=-1),
    }


class SD3TextEncoders(nnx.Module):
    """``(clip_l_ids [B, Lc], clip_g_ids [B, Lc], t5_ids [B, Lt]) -> cond`` as diffusers'
    ``StableDiffusion3Pipeline.encode_prompt`` computes ``(prompt_embeds,
    pooled_prompt_embeds)`` from the tokenizers' ``padding="max_length"`` ids.

    Attributes ``clip_l``, ``clip_g`` and ``t5`` are the pipeline's ``text_encoder``,
    ``text_encoder_2`` and ``text_encoder_3`` (load each with ``interop.transformers_text``).
    """

    def __init__(self, clip_l: CLIPTextEncoder, clip_g: CLIPTextEncoder, t5: T5Encoder):
        self.clip_l = clip_l
        self.clip_g = clip_g
        self.t5 = t5

    def __call__(
        self,
        clip_l_ids: jax.Array,
        clip_g_ids: jax.Array,
        t5_ids: jax.Array,
        *,
        clip_skip: int | None = None,
    ) -> dict[str, jax.Array]:
        layer = -(clip_skip or 0) - 2

        def run(encoder: nnx.Module, ids: jax.Array, **kwargs) -> jax.Array:
            return encoder(ids, jnp.ones(ids.shape, bool), **kwargs)  # diffusers passes no mask

        return sd3_conditions(
            run(self.clip_l, clip_l_ids, output_hidden_layer=layer),
            run(self.clip_g, clip_g_ids, output_hidden_layer=layer),
            run(self.t5, t5_ids),
        )

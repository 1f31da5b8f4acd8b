"""Text encoders: token ids -> (per-token features, pooled vector).

The backbone never sees an encoder, only the ``cond`` dict built from its
outputs (``"text"``, ``"text_mask"``, ``"pooled"``), so any callable matching
``TextEncoder`` plugs in.
"""

from typing import Protocol

import jax

from danceopd_jax.models.text.clip import CLIPTextConfig, CLIPTextEncoder, tiny_text_config


class TextEncoder(Protocol):
    """Callable text encoder.

    ``(input_ids [B, L] int32, attention_mask [B, L] bool) -> (tokens [B, L, D], pooled [B, P])``
    """

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]: ...


__all__ = ["CLIPTextConfig", "CLIPTextEncoder", "TextEncoder", "tiny_text_config"]

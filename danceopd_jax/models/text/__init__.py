"""Text encoders: token ids -> (per-token features, pooled vector).

The backbone never sees an encoder, only the ``cond`` dict built from its
outputs (``"text"``, ``"text_mask"``, ``"pooled"``), so any callable matching
``TextEncoder`` plugs in.
"""

from typing import Protocol

import jax

from danceopd_jax.models.text.clip import CLIPTextConfig, CLIPTextEncoder, tiny_text_config
from danceopd_jax.models.text.sd3 import SD3TextEncoders, sd3_conditions
from danceopd_jax.models.text.t5 import T5Config, T5Encoder


class TextEncoder(Protocol):
    """Callable text encoder.

    ``(input_ids [B, L] int32, attention_mask [B, L] bool) -> (tokens [B, L, D], pooled [B, P])``
    """

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]: ...


__all__ = ["CLIPTextConfig", "CLIPTextEncoder", "SD3TextEncoders", "T5Config", "T5Encoder",
           "TextEncoder", "sd3_conditions", "tiny_text_config"]

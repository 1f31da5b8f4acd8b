"""Z-Image's prepared conditions (the prepare command, data/conditions.py's
``ConditionEncoder``), as its pipelines compute them from a diffusers Z-Image pipeline folder,
by our Flax Qwen3 and SigLIP2 (no torch):

* a row without a source image: ``text`` / ``text_mask``, the prompt in ``ZImagePipeline``'s
  chat template (``hidden_states[-2]`` at the real tokens; padding masked);
* a row with a source image (``ZImageOmniPipeline`` with one condition image): the prompt piece
  of the omni template, ``<|vision_end|>`` prompt ``<|im_end|>`` ... ``<|vision_start|>``, as
  ``text`` / ``text_mask``, and ``siglip`` [h, w, C], the source's SigLIP2 features
  (``prepare_siglip_embeds``) when the folder has ``siglip`` and ``siglip_processor``;
* the empty-prompt entries: the empty prompt in both templates (``text``, ``text_omni``), CFG's
  unconditional branch, and the omni template's two constant pieces around the condition image
  (``text_prefix``, ``text_suffix``), which every prompt shares.

models/zimage.py ``precomputed`` turns them into the module's cond.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from danceopd_jax.interop.transformers_text import ZImagePromptEncoder, zimage_prompt_segments
from danceopd_jax.interop.transformers_vision import ZIMAGE_SIGLIP_FOLDERS, SiglipImageEncoder

Arrays = dict[str, np.ndarray]


class ZImageConditions:
    """Z-Image's conditions of prepared rows (module docstring); ``siglip`` is None for a
    text-to-image pipeline folder (no ``siglip``), whose source rows then carry no features."""

    def __init__(self, pipeline: str | os.PathLike, max_sequence_length: int = 512,
                 batch_size: int = 16):
        pipeline = Path(pipeline)
        self.prompts = ZImagePromptEncoder(pipeline, max_sequence_length, batch_size)
        has_siglip = all((pipeline / sub).is_dir() for sub in ZIMAGE_SIGLIP_FOLDERS)
        self.siglip = SiglipImageEncoder(pipeline, batch_size) if has_siglip else None

    def text(self, prompts: list[str], with_source: bool) -> Arrays:
        if with_source:  # only the prompt piece: the template's other pieces are constant
            texts = [zimage_prompt_segments(p, num_condition_images=1)[1] for p in prompts]
            features, mask = self.prompts.encode(texts)
        else:
            features, mask = (x[:, 0] for x in self.prompts(prompts))
        return {"text": features, "text_mask": mask}

    def null(self) -> Arrays:
        prefix, piece, suffix = zip(*self.prompts.encode(
            zimage_prompt_segments("", num_condition_images=1)), strict=True)
        pieces = {"text_omni": piece, "text_prefix": prefix, "text_suffix": suffix}
        out = self.text([""], with_source=False)
        for name, (features, mask) in pieces.items():
            out |= {name: features[None], f"{name}_mask": mask[None]}
        return out

    def source(self, images: np.ndarray) -> Arrays:
        return {} if self.siglip is None else {"siglip": self.siglip(images)}

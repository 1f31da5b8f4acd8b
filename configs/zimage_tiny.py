"""Z-Image's real-model path end to end on CPU, from the tiny random checkpoints and images
that launch/zimage_tiny_e2e.py writes under ROOT (nothing downloaded):

    python -m danceopd_jax.main --config=configs/zimage_tiny.py:ROOT --workdir=ROOT/run

As configs/sd3_tiny.py (config.tiny_real_config) on a ZImageOmniPipeline's parts: the anchor
(ROOT/pipeline/transformer, an omni transformer that reads SigLIP features), a full fine-tune
(ROOT/edit_transformer) and a LoRA on the anchor (ROOT/edit_lora); edits in Z-Image's own omni
layout. The LoRA student trains nothing in full: Z-Image has no source embedding.
"""

from danceopd_jax.config import tiny_real_config


def get_config(root: str = "runs/zimage_tiny"):
    c = tiny_real_config(root)
    c.training.lora_full = ""
    return c

"""Real-model path end to end on CPU, from the tiny random checkpoints and images that
launch/sd3_tiny_e2e.py writes under ROOT (nothing downloaded):

    python -m danceopd_jax.main --config=configs/sd3_tiny.py:ROOT --workdir=ROOT/run

Three teachers, one per kind of diffusers checkpoint: the anchor (ROOT/pipeline/transformer),
a full fine-tune (ROOT/edit_transformer) and a LoRA on the anchor (ROOT/edit_lora); T2I
samples go to the anchor with CFG, edit samples to the two edit teachers. LoRA student on
scanned layers (config.tiny_real_config).
"""

from danceopd_jax.config import tiny_real_config


def get_config(root: str = "runs/sd3_tiny"):
    return tiny_real_config(root)

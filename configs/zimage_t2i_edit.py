"""T2I + edit fusion on Z-Image (the paper's main setting, METHOD.md 8-9): the Z-Image T2I
anchor and a Z-Image edit teacher (in the reference, a LoRA fine-tune of the base), one LoRA
student (r = alpha = 128, lr 2e-4, 3,000 steps, 1024^2, N = 16, K = 1, Beta(5, 2), shift 3).

Every path is a placeholder: the run stops at config validation, before anything loads, and
names the field to set. For example (a ZImageOmniPipeline folder: its Qwen3 prompt pieces and
SigLIP features of the source images, its VAE's latents):

    python -m danceopd_jax.prepare --backbone=zimage --input=data/rows.jsonl \
        --out=data/zimage_prepared --text_encoders=z-image-omni --vae=z-image-omni/vae \
        --resolution=1024 --config=configs/zimage_t2i_edit.py
    python -m danceopd_jax.main --config=configs/zimage_t2i_edit.py --workdir=runs/zimage \
        --config.world.conditions=data/zimage_prepared \
        --config.teachers.anchor.path=z-image-omni/transformer \
        --config.teachers.edit.path=zimage-edit/transformer

The prepared world builds Z-Image from the anchor's config.json; edits run in Z-Image's own
omni layout (clean source latent, SigLIP features and the caption's template pieces in one
sequence), so the exported student edits in diffusers' ZImageOmniPipeline as it is. An edit
teacher given as a LoRA on the anchor: --config.teachers.edit.path=edit_lora.safetensors
--config.teachers.edit.lora_base=anchor. configs/zimage_tiny.py runs the same path on CPU.
"""

from danceopd_jax.config import diffusers_teacher, prepared_config, required, route


def get_config():
    c = prepared_config()
    c.teachers.anchor.path = required(
        "the Z-Image diffusers transformer folder (<Z-Image pipeline>/transformer)")
    c.teachers.edit = diffusers_teacher("edit", required(
        "the Z-Image edit teacher: a diffusers transformer folder fine-tuned from the anchor, "
        "or a LoRA file with lora_base='anchor'"))
    # Teachers are queried with CFG over the text only (edits keep the source in the
    # unconditional branch); the student absorbs it and samples in one pass (METHOD.md 4).
    c.routes.t2i = route("anchor", "t2i", 0.25, cfg_alpha=3.5)
    c.routes.edit = route("edit", "edit", 0.75, cfg_alpha=3.5)
    c.training.lora_full = ""  # Z-Image reads source images natively: no source embedding
    return c

"""T2I + edit fusion on SD3.5-Medium (the paper's SD3.5 setting): the SD3.5-Medium anchor and
an edit teacher fine-tuned from it, one LoRA student (r = alpha = 128) on prepared data.

Every path is a placeholder: the run stops at config validation, before anything loads, and
names the field to set. For example:

    python -m danceopd_jax.prepare --input=data/rows.jsonl --out=data/sd35_prepared \\
        --text_encoders=sd3.5-medium --vae=sd3.5-medium/vae --resolution=1024 \\
        --config=configs/sd35_t2i_edit.py
    python -m danceopd_jax.main --config=configs/sd35_t2i_edit.py --workdir=runs/sd35 \\
        --config.world.conditions=data/sd35_prepared \\
        --config.teachers.anchor.path=sd3.5-medium/transformer \\
        --config.teachers.edit.path=sd35-edit/transformer

An edit teacher given as a LoRA on the anchor instead of a full fine-tune:
--config.teachers.edit.path=edit_lora.safetensors --config.teachers.edit.lora_base=anchor.
The table's rows need tasks "t2i" (prompts) and "edit" (prompts with source images).
"""

from danceopd_jax.config import diffusers_teacher, prepared_config, required, route


def get_config():
    c = prepared_config()
    c.teachers.anchor.path = required(
        "the SD3.5-Medium diffusers transformer folder (stabilityai/stable-diffusion-3.5-medium"
        "/transformer)")
    c.teachers.edit = diffusers_teacher("edit", required(
        "the edit teacher: a diffusers transformer folder fine-tuned from the anchor for edits "
        "(an export of ours holds source_embed.npy), or a LoRA file with lora_base='anchor'"))
    # Edits are what the student must acquire (the anchor's T2I is kept easily). Teachers are
    # queried with CFG (text only); the student absorbs it and samples in one pass.
    c.routes.t2i = route("anchor", "t2i", 0.25, cfg_alpha=3.5)
    c.routes.edit = route("edit", "edit", 0.75, cfg_alpha=3.5)
    return c

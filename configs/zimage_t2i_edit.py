"""T2I + edit fusion on Z-Image (the paper's main setting, METHOD.md 8-9): the Z-Image T2I
anchor and a Z-Image edit teacher (in the reference, a LoRA fine-tune of the base), one LoRA
student (r = alpha = 128, lr 2e-4, 3,000 steps, 1024^2, N = 16, K = 1, Beta(5, 2), shift 3).

Every path is a placeholder: the run stops at config validation, before anything loads, and
names the field to set (--config.teachers.anchor.path=..., --config.teachers.edit.path=...,
--config.world.conditions=...).

Status: the backbone (models/zimage.py) and its diffusers converter exist, but the prepared
world still builds the SD3 MMDiT from the anchor's config.json and `prepare` writes SD3
conditions; training Z-Image needs the backbone contract of issue 16 and Z-Image conditions
(Qwen3 caption pieces, SigLIP features). Until then this file records the paper's run.
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
    return c

"""Local + global edit fusion on Z-Image (METHOD.md 8-9): a local-edit and a global-edit
teacher (LoRA fine-tunes of the Z-Image base in the reference), one LoRA student started from
the base (r = alpha = 128, lr 2e-4, 3,000 steps, 1024^2, N = 16, K = 1, Beta(5, 2), shift 3).

Every path is a placeholder that stops the run at config validation, naming the field. Prepare
the data as for configs/zimage_t2i_edit.py (`prepare --backbone=zimage`, rows of tasks
"local_edit" and "global_edit" with source images).
"""

from danceopd_jax.config import diffusers_teacher, prepared_config, required, route


def get_config():
    c = prepared_config()
    c.teachers.anchor.path = required(
        "the Z-Image diffusers transformer folder (<Z-Image pipeline>/transformer): the base "
        "the student starts from")
    c.teachers.local_edit = diffusers_teacher("edit", required(
        "the local-edit teacher: a Z-Image transformer folder, or a LoRA file with "
        "lora_base='anchor'"))
    c.teachers.global_edit = diffusers_teacher("edit", required(
        "the global-edit teacher: a Z-Image transformer folder, or a LoRA file with "
        "lora_base='anchor'"))
    c.routes.local_edit = route("local_edit", "local_edit", 0.5, cfg_alpha=3.5)
    c.routes.global_edit = route("global_edit", "global_edit", 0.5, cfg_alpha=3.5)
    c.training.lora_full = ""  # Z-Image reads source images natively: no source embedding
    return c

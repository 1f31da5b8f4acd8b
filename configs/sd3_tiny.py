"""Real-model path end to end on CPU, from the tiny random checkpoints and images that
launch/sd3_tiny_e2e.py writes under ROOT (nothing downloaded):

    python -m danceopd_jax.main --config=configs/sd3_tiny.py:ROOT --workdir=ROOT/run

Three teachers, one per kind of diffusers checkpoint: the anchor (ROOT/pipeline/transformer),
a full fine-tune (ROOT/edit_transformer) and a LoRA on the anchor (ROOT/edit_lora); T2I
samples go to the anchor with CFG, edit samples to the two edit teachers. LoRA student on
scanned layers.
"""

from danceopd_jax.config import diffusers_teacher, prepared_config, route


def get_config(root: str = "runs/sd3_tiny"):
    c = prepared_config()
    c.world.conditions = f"{root}/prepared"
    c.model = dict(dtype="float32", scan_layers=True, remat="none", attention="xla")
    c.teachers.anchor = diffusers_teacher("t2i", f"{root}/pipeline/transformer")
    c.teachers.edit_full = diffusers_teacher("edit", f"{root}/edit_transformer")
    c.teachers.edit_lora = diffusers_teacher("edit", f"{root}/edit_lora", lora_base="anchor")
    c.routes.t2i = route("anchor", "t2i", 0.5, cfg_alpha=2.0)
    c.routes.edit_full = route("edit_full", "edit", 0.25)
    c.routes.edit_lora = route("edit_lora", "edit", 0.25)
    c.danceopd.num_steps = 4
    c.training.update(steps=4, batch_size=4, lr=1e-3, lora_rank=4, lora_alpha=4.0,
                      checkpoint_every=2, sample_every=2, log_every=1)
    c.eval.update(sample_steps=4, num_samples=2)
    return c

"""Local + global edit fusion: one student from a local-edit and a global-edit teacher."""

from danceopd_jax.config import EDIT_STEPS, base_config, route, teacher


def get_config():
    c = base_config()
    c.teachers.local_edit = teacher("edit", "local_edit", "anchor", steps=EDIT_STEPS, lr=5e-4)
    c.teachers.global_edit = teacher("edit", "global_edit", "anchor", steps=EDIT_STEPS, lr=5e-4)
    c.routes.local = route("local_edit", "local_edit", 0.5)
    c.routes["global"] = route("global_edit", "global_edit", 0.5)
    return c

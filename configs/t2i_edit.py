"""T2I + edit fusion (the default): the T2I anchor and a joint local+global edit teacher."""

from danceopd_jax.config import JOINT_EDIT_STEPS, base_config, route, teacher


def get_config():
    c = base_config()
    c.teachers.joint_edit = teacher("edit", "joint_edit", "anchor", steps=JOINT_EDIT_STEPS, lr=5e-4)
    c.routes.t2i = route("anchor", "t2i", 0.5)
    c.routes.edit = route("joint_edit", "joint_edit", 0.5)
    return c

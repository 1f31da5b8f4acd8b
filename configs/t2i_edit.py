"""T2I + edit fusion (the default): the T2I anchor and a joint local+global edit teacher."""

from danceopd_jax.config import base_config, edit_teacher, route


def get_config():
    c = base_config()
    c.teachers.joint_edit = edit_teacher("joint_edit")
    # The anchor's T2I is kept easily (1.000 -> 1.000 at 0.5 / 0.5); editing is what the
    # student must acquire, so three quarters of each batch are edits.
    c.routes.t2i = route("anchor", "t2i", 0.25)
    c.routes.edit = route("joint_edit", "joint_edit", 0.75)
    return c

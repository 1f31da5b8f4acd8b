"""Local + global edit fusion: one student from a local-edit and a global-edit teacher."""

from danceopd_jax.config import base_config, edit_teacher, route


def get_config():
    c = base_config()
    c.teachers.local_edit = edit_teacher("local_edit")
    c.teachers.global_edit = edit_teacher("global_edit")
    # Not routed (so never prepared) unless an edit teacher starts from it, e.g. the reproduce
    # command's cpu preset: --config.teachers.local_edit.init=joint_edit.
    c.teachers.joint_edit = edit_teacher("joint_edit")
    c.routes.local = route("local_edit", "local_edit", 0.5)
    c.routes["global"] = route("global_edit", "global_edit", 0.5)
    return c

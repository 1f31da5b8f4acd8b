"""Local + global edit fusion: one student from a local-edit and a global-edit teacher, with the
paper's DanceOPD recipe and the default's budget (config.paper_student).

The local- and global-edit teachers are not shipped: this config trains them on first use
(about 90 minutes each on 2 CPU cores). configs/omni_edit_fusion.py is the same fusion on the
omni teacher family, once that family is trained and shipped (docs/teachers.md)."""

from danceopd_jax.config import base_config, edit_teacher, paper_student, route, target


def get_config():
    c = paper_student(base_config())
    c.teachers.local_edit = edit_teacher("local_edit")
    c.teachers.global_edit = edit_teacher("global_edit")
    # Not routed (so never prepared) unless an edit teacher starts from it, e.g. the reproduce
    # command's cpu preset: --config.teachers.local_edit.init=joint_edit.
    c.teachers.joint_edit = edit_teacher("joint_edit")
    c.routes.local = route("local_edit", "local_edit", 0.5)
    c.routes["global"] = route("global_edit", "global_edit", 0.5)
    # Each teacher's capability kept: >= 0.90 x the local teacher on the local categories and
    # x the global teacher on the global ones (T2I within 0.02 of the anchor: the base's).
    c.eval.targets.local = target("edit_local", "local_edit", "ratio", 0.9)
    c.eval.targets["global"] = target("edit_global", "global_edit", "ratio", 0.9)
    return c

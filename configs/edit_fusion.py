"""Local + global edit fusion: one student from the omni family's local- and global-edit
teachers (fine-tuned from the omni base, config.omni_family), with the paper's DanceOPD recipe
and the default's budget (config.paper_student), as configs/t2i_edit.py.

Both teachers are shipped (danceopd_jax/assets/omni_teachers/; docs/teachers.md has their
scores)."""

from danceopd_jax.config import base_config, omni_family, paper_student, route, target


def get_config():
    c = omni_family(paper_student(base_config()))
    c.routes.local = route("local_edit", "local_edit", 0.5)
    c.routes["global"] = route("global_edit", "global_edit", 0.5)
    # Each teacher's capability kept: >= 0.90 x the local teacher on the local categories and
    # x the global teacher on the global ones (T2I within 0.02 of the anchor: the base's).
    c.eval.targets.local = target("edit_local", "local_edit", "ratio", 0.9)
    c.eval.targets["global"] = target("edit_global", "global_edit", "ratio", 0.9)
    return c

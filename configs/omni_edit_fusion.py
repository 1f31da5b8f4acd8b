"""Local + global edit fusion on the omni teacher family (configs/omni_family.py): the paper's
DanceOPD recipe with the default's budget (as configs/edit_fusion.py), at the paper's
learning rate 2e-4. The local- and global-edit teachers are not shipped yet: a first run trains
them (about an hour each on 2 CPU cores; resumable) and reuses them afterwards."""

from danceopd_jax.config import base_config, omni_family, paper_student, route, target


def get_config():
    c = omni_family(paper_student(base_config()))
    c.training.lr = 2e-4  # the paper's rate, as configs/omni_family.py (measured there)
    c.routes.local = route("local_edit", "local_edit", 0.5)
    c.routes["global"] = route("global_edit", "global_edit", 0.5)
    c.eval.targets.local = target("edit_local", "local_edit", "ratio", 0.9)
    c.eval.targets["global"] = target("edit_global", "global_edit", "ratio", 0.9)
    return c

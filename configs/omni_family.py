"""The omni teacher family (docs/teachers.md, "The omni teacher family"): an omni base (the
anchor: the shipped T2I anchor trained further on T2I and source-conditioned generation) and
joint-, local- and global-edit teachers fine-tuned from it (config.omni_family), shipped in
danceopd_jax/assets/omni_teachers/ (`bash launch/make_teachers.sh omni` makes them).

As a main-job config: T2I + edit fusion on the omni base, the paper's DanceOPD recipe with the
default's budget (as configs/t2i_edit.py), at the paper's learning rate 2e-4."""

from danceopd_jax.config import base_config, omni_family, paper_student, route, target


def get_config():
    c = omni_family(paper_student(base_config()))
    # The paper's rate (METHOD.md 8): at the default's 1e-3 this student first collapsed (T2I
    # 0.44 -> 0.13 in 200 steps) and ended 0.361 / 0.318; at 2e-4, 0.469 / 0.358 (docs/teachers.md).
    c.training.lr = 2e-4
    c.routes.t2i = route("anchor", "t2i", 0.1875)
    c.routes.edit = route("joint_edit", "joint_edit", 0.8125)
    c.eval.targets.edit = target("edit", "joint_edit", "ratio", 0.9)
    return c

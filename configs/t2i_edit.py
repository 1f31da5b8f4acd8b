"""T2I + edit fusion (the default): the paper's DanceOPD (N = 16 rollout steps, K = 1 query
from Beta(5, 2) drawn per sample, per-sample hard routing, lr 2e-4) fusing the omni base (the
anchor) and the joint-edit teacher fine-tuned from it, both shipped (config.omni_family,
docs/teachers.md "The omni teacher family"). Only budget knobs differ from METHOD.md 8
(config.paper_student). A recipe that learns edits faster in 30 CPU minutes, on the T2I-only
anchor of the shapes family: configs/t2i_edit_budget.py.

As a teacher config it declares the whole omni family (the T2I anchor it starts from, the base,
and joint-, local- and global-edit teachers): `bash launch/make_teachers.sh omni` makes it."""

from danceopd_jax.config import base_config, omni_family, paper_student, route, target


def get_config():
    c = omni_family(paper_student(base_config()))
    # Editing is what the student must improve most (the base edits 0.16, the teacher 0.88), so
    # most of each batch is edits: 3 T2I + 13 edit samples of 16.
    c.routes.t2i = route("anchor", "t2i", 0.1875)
    c.routes.edit = route("joint_edit", "joint_edit", 0.8125)
    # The targets: the student's edits at least 0.90 x the edit teacher's (and T2I
    # within 0.02 of the anchor's: the base config's).
    c.eval.targets.edit = target("edit", "joint_edit", "ratio", 0.9)
    return c

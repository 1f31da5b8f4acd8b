"""T2I + edit fusion (the default): the paper's DanceOPD (N = 16 rollout steps, K = 1 query
from Beta(5, 2) drawn per sample, per-sample hard routing) fusing the shipped T2I anchor and
joint local+global edit teacher. Only budget knobs differ from METHOD.md 8 (config.paper_student).
A recipe that learns edits faster in 30 CPU minutes: configs/t2i_edit_budget.py."""

from danceopd_jax.config import base_config, edit_teacher, paper_student, route, target


def get_config():
    c = paper_student(base_config())
    c.teachers.joint_edit = edit_teacher("joint_edit")
    # Editing is what the student must acquire (the anchor has never seen a source image), so
    # most of each batch is edits: 3 T2I + 13 edit samples of 16.
    c.routes.t2i = route("anchor", "t2i", 0.1875)
    c.routes.edit = route("joint_edit", "joint_edit", 0.8125)
    # The targets: the student's edits at least 0.90 x the edit teacher's (and T2I
    # within 0.02 of the anchor's: the base config's).
    c.eval.targets.edit = target("edit", "joint_edit", "ratio", 0.9)
    return c

"""T2I + edit fusion (the default): the paper's DanceOPD (N = 16 rollout steps, K = 1 query
from Beta(5, 2) drawn per sample, per-sample hard routing, lr 2e-4, started from the teachers'
weight merge) fusing the omni base (the anchor) and the joint-edit teacher fine-tuned from it,
both shipped (config.omni_family, docs/teachers.md "The omni teacher family"). Only budget
knobs differ from METHOD.md 8 (config.paper_student). The default before issue 14, a budget
recipe on the T2I-only anchor of the shapes family: configs/t2i_edit_budget.py.

As a teacher config it declares the whole omni family (the T2I anchor it starts from, the base,
and joint-, local- and global-edit teachers): `bash launch/make_teachers.sh omni` makes it."""

from danceopd_jax.config import base_config, omni_family, paper_student, route, target


def get_config():
    c = omni_family(paper_student(base_config()))
    # 4 T2I + 12 edit samples of 16. The student starts from paper_student's merge, the anchor
    # plus 1/2 of the teacher's delta, less than the edit route's 3/4 share: the merge at 3/4
    # edits more from step 0 but has lost more T2I, which the anchor's route restored only to
    # 0.025 below the anchor; from 1/2 the student keeps the anchor's T2I (three training seeds
    # each at 1,400 steps; at 2,800 steps it kept T2I and reached 95% of the teacher's edits:
    # docs/teachers.md).
    c.routes.t2i = route("anchor", "t2i", 0.25)
    c.routes.edit = route("joint_edit", "joint_edit", 0.75)
    # The targets: the student's edits at least 0.90 x the edit teacher's (and T2I
    # within 0.02 of the anchor's: the base config's).
    c.eval.targets.edit = target("edit", "joint_edit", "ratio", 0.9)
    return c

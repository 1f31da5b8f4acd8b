"""python -m danceopd_jax.teachers --config=configs/t2i_edit.py --workdir=DIR [--ship]

Trains (or reuses) every teacher a config defines, or those --teachers names, exactly as the
main job would, and with --ship copies those it trained into the package
(danceopd_jax/assets/<config.shipped_teachers>/, the default's omni family in omni_teachers/) so
that the main job reuses them whenever its recipe matches; one it reused from the package is
already there. This is how the shipped teachers were made (launch/make_teachers.sh);
launch/anchor_sweep.sh trains and scores candidate T2I anchors with it.
"""

from __future__ import annotations

from absl import flags

from danceopd_jax import cli
from danceopd_jax.jobs.teachers import ASSETS_DIR, make_teachers

_CONFIG = cli.config_flag("config", "configs/t2i_edit.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/teachers", "Where the teachers are trained.")
_EVALUATE = flags.DEFINE_bool("evaluate", True, "Score every teacher with ShapesBench on "
                              "held-out data (config.eval's num, seeds and sample_steps), on "
                              "what its recipe trains: T2I, edits or both.")
_REUSE = flags.DEFINE_bool("reuse_shipped", False,
                           "Reuse shipped teachers whose recipe matches instead of retraining.")
_ONLY = flags.DEFINE_list("teachers", [], "Only these teachers of the config (and what they "
                          "need: the anchor and the teachers they are fine-tuned from); "
                          "default: every one.")
_SHIP = flags.DEFINE_bool("ship", False, f"Copy the teachers this run trained into {ASSETS_DIR}/"
                          "<config.shipped_teachers>/ (not those it reused from there).")


def main() -> None:
    table = make_teachers(_CONFIG.value, _WORKDIR.value, _EVALUATE.value, _REUSE.value,
                          _SHIP.value, _ONLY.value)
    if table:
        print(table, flush=True)


if __name__ == "__main__":
    cli.run(main)

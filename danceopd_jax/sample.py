"""python -m danceopd_jax.sample --workdir=DIR --prompt="..." [--source=img.png] [--out=x.png]

Generates with the trained student of a workdir (its latest checkpoint). With --source the
prompt is an edit instruction applied to that image; without, it is a T2I prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image

from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.data.batches import to_unit_range
from danceopd_jax.data.shapes.tokenizer import encode
from danceopd_jax.eval.shapes import make_generator
from danceopd_jax.train.checkpoint import CheckpointError, RunCheckpoints, load_params
from danceopd_jax.train.distill import build, initial_trainable
from danceopd_jax.train.model import student_params_fn
from danceopd_jax.train.state import TrainState, make_optimizer

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by danceopd_jax.main.",
                               required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "T2I prompt or edit instruction.", required=True)
_SOURCE = flags.DEFINE_string("source", None, "Source image (PNG) to edit.")
_OUT = flags.DEFINE_string("out", "sample.png", "Where to write the generated image.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: config.eval.sample_steps).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_NUM = flags.DEFINE_integer("num", 4, "How many samples (written side by side).")


def load_student(workdir: Path):
    """(config, models, student params, text params) from a workdir's latest checkpoint."""
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{workdir} has no config.json; is it a danceopd_jax.main workdir?")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    _, world, models, backbone, text = build(config, workdir)
    anchor, _ = load_params(workdir / "teachers" / "anchor", {"backbone": backbone, "text": text})
    tc = config.training
    frozen = {"teachers": {"anchor": anchor["backbone"]}, "text": anchor["text"]}
    optimizer = make_optimizer(tc.lr, tc.weight_decay, tc.grad_clip, tc.warmup_steps)
    like = TrainState.create(initial_trainable(config, frozen), optimizer, config.seed)
    state, _ = RunCheckpoints(workdir / "checkpoints").restore(like)
    student = student_params_fn("anchor", tc.lora_alpha or float(tc.lora_rank))(
        state.trainable, frozen)
    return config, world, models, student, anchor["text"]


def main(argv: list[str]) -> None:
    del argv
    config, world, models, student, text = load_student(Path(_WORKDIR.value).absolute())
    size = config.world.image_size
    ids, mask = encode(world.tokenizer, [_PROMPT.value] * _NUM.value)
    batch = {"input_ids": ids, "attention_mask": mask,
             "target": np.zeros((_NUM.value, size, size, 3), np.float32)}
    if _SOURCE.value:
        src = np.asarray(Image.open(_SOURCE.value).convert("RGB").resize((size, size),
                                                                          Image.NEAREST))
        batch["source"] = np.broadcast_to(to_unit_range(src), (_NUM.value, size, size, 3))
        batch["has_source"] = np.ones((_NUM.value,), bool)
    sigmas = make_sigmas(_STEPS.value or config.eval.sample_steps, config.danceopd.shift,
                         config.danceopd.schedule)
    generate = make_generator(models.field(), models.conditioner(), sigmas)
    images = np.asarray(generate(student, text, batch, jax.random.key(_SEED.value)))
    Image.fromarray(np.concatenate(list(images), axis=1)).resize(
        (size * 4 * _NUM.value, size * 4), Image.NEAREST).save(_OUT.value)
    print(f"wrote {_NUM.value} sample(s) for {_PROMPT.value!r} to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

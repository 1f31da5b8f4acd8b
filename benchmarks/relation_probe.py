"""Does a shapes-world T2I model read relation words? A diagnostic, not a timing benchmark.

    python benchmarks/relation_probe.py [--teacher=DIR] [--config=configs/t2i_edit.py]
        [--config.model.KEY=VALUE ...]   # the teacher's model fields, as its teachers command had

DIR is a saved teacher (workdir/teachers/NAME) or one step of a teacher's run checkpoints
(workdir/teachers/_runs/NAME/STEP), to follow a training run while it goes.

For "a red circle REL a blue square on a white background" (REL: to the left of, to the right
of, above, below, and) it prints, from the model saved in DIR (default: the shipped T2I anchor):
  - sigma = 1: the red share of each column and row of the mean predicted clean image (the
    data puts 2/3 : 1/3 : 0 from the asked side; a model that ignores REL prints the same for
    every prompt);
  - sampled (16 Euler steps on the students' shift-3 schedule): how many images hold both
    objects in distinct cells, and how often REL holds among them (random cells: 0.375);
  - given the red circle drawn alone in the centre cell and noised to sigma 0.8: the blue share
    of each column and row of the predicted clean image (left of: all of it in the right
    column, above: all of it in the bottom row); and per axis, at sigma 0.7, 0.8 and 0.9 (the
    band where the relation has to be read: benchmarks/relation_signal.py), the blue share on
    the side "to the left of" ("above") asks for minus that side's share under "to the right
    of" ("below"): 1 for a model that reads the relation, 0 for one that ignores it;
  - the control, named cells ("a red circle at the left / right / top / bottom on a white
    background"), sigma = 1: the red share of the named column or row of the mean predicted
    clean image (the data puts all of it there, the shipped anchor 0.82-0.83; a model that
    ignores named cells prints about a third: it reads no spatial word at all, and the
    relation measures above say nothing more about it);
  - the text encoder's relative distance between the token outputs of two prompts.
docs/teachers.md ("What the base's T2I misses") reports what it found on the shipped anchor.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from ml_collections import config_flags

from danceopd_jax.core.rollout import sample
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.data.shapes.tokenizer import encode, load_tokenizer
from danceopd_jax.data.shapes.world import GRID, PALETTE, Obj, Scene, render
from danceopd_jax.data.store import load_params
from danceopd_jax.models.wiring import init_models
from danceopd_jax.train.teachers import SHIPPED_DIR

RELATIONS = {"to the left of": (0, 0), "to the right of": (0, 2), "above": (1, 0),
             "below": (1, 2), "and": None}  # (0: columns / 1: rows, the side A must be on)
NAMED = {"at the left": (0, 0), "at the right": (0, 2), "at the top": (1, 0),
         "at the bottom": (1, 2)}  # (0: columns / 1: rows, the named side)
N = 256
BAND = (0.7, 0.8, 0.9)  # noise levels where reading REL pays (benchmarks/relation_signal.py)
_CONFIG = config_flags.DEFINE_config_file("config", "configs/t2i_edit.py",
                                          "The config the teacher was made with.")
_TEACHER = flags.DEFINE_string("teacher", str(SHIPPED_DIR / "anchor"),
                               "A saved teacher, or one step of a teacher's run checkpoints.")


def prompt(rel: str) -> str:
    return f"a red circle {rel} a blue square on a white background"


def named(where: str) -> str:
    return f"a red circle {where} on a white background"


def per_cell(x: np.ndarray) -> np.ndarray:
    """[..., H, W] -> [..., GRID, GRID]: the mean over each grid cell's pixels."""
    side = x.shape[-1] // GRID
    return x.reshape(*x.shape[:-2], GRID, side, GRID, side).mean((-3, -1))


def shares(x: np.ndarray, channel: int, other: int) -> np.ndarray:
    """[3, 3] share of one colour (channel minus the other, clipped) per grid cell."""
    c = per_cell(np.clip(x[..., channel] - x[..., other], 0, None))
    return c / max(c.sum(), 1e-9)


def cells(x: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """[B, 9] fraction of each cell's pixels near colour rgb."""
    t = np.asarray(rgb) / 127.5 - 1
    return per_cell((((x - t) ** 2).sum(-1) < 0.1).astype(np.float32)).reshape(len(x), -1)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    tok = load_tokenizer()
    null_ids, null_mask = encode(tok, [""])
    models, backbone, text = init_models(config, len(tok), tok.eos_token_id, null_ids,
                                         null_mask, 0)
    run_step = Path(_TEACHER.value) / "state"
    if run_step.is_dir():  # a run checkpoint: its trainable params are the teacher's
        p = ocp.StandardCheckpointer().restore(run_step.absolute())["trainable"]
    else:
        p, _ = load_params(_TEACHER.value, {"backbone": backbone, "text": text})
    field, condition = models.field(), models.conditioner()
    sigmas = make_sigmas(16, 3.0, config.danceopd.schedule)
    size = config.world.image_size
    centre = render(Scene("white", (Obj("circle", "red", 4),)), size) / 127.5 - 1

    def clean_at_one(ids, mask, key):
        """(cond, noise, the predicted clean image from pure noise)."""
        cond = condition({"text": p["text"]}, {"input_ids": ids, "attention_mask": mask}, key)
        z = jax.random.normal(key, (ids.shape[0], size, size, 3))
        return cond, z, z - field(p["backbone"], z, jnp.ones(ids.shape[0]), cond)

    @jax.jit
    def probe(ids, mask, key):
        cond, z, x1 = clean_at_one(ids, mask, key)
        one = jnp.ones(ids.shape[0])
        drawn = jnp.asarray(centre, jnp.float32)[None]
        xc = []
        for s in BAND:
            zs = (1 - s) * drawn + s * z
            xc.append((zs - s * field(p["backbone"], zs, s * one, cond)).mean(0))
        return x1.mean(0), jnp.stack(xc), sample(field, p["backbone"], z, sigmas, cond)

    blue_by = {}
    for rel, side in RELATIONS.items():
        ids, mask = encode(tok, [prompt(rel)] * N)
        x1, xc, xs = (np.asarray(a) for a in probe(jnp.asarray(ids), jnp.asarray(mask),
                                                     jax.random.key(0)))
        red = shares(x1, 0, 2)
        blue = [shares(x, 2, 0) for x in xc]
        blue_by[rel] = blue
        centre_08 = blue[BAND.index(0.8)]
        r, b = cells(np.clip(xs, -1, 1), PALETTE["red"]), cells(np.clip(xs, -1, 1),
                                                               PALETTE["blue"])
        both = [(a.argmax(), c.argmax()) for a, c in zip(r, b, strict=True)
                if a.max() > 0.3 and c.max() > 0.3 and a.argmax() != c.argmax()]
        line = (f"{rel:16s} sigma=1 red cols {red.sum(0).round(3)} rows {red.sum(1).round(3)}"
                f" | red drawn at centre, sigma 0.8: blue cols {centre_08.sum(0).round(3)}"
                f" rows {centre_08.sum(1).round(3)}"
                f" | sampled: both in {len(both)}/{N}")
        if side is not None:
            axis, want = side
            pos = [(divmod(a, GRID)[1 - axis], divmod(c, GRID)[1 - axis]) for a, c in both]
            holds = [(a < c) if want == 0 else (a > c) for a, c in pos]
            line += f", relation holds {np.mean(holds):.2f}" if holds else ""
        print(line)

    for a, b in (("to the left of", "to the right of"), ("above", "below")):
        axis, want = RELATIONS[a]  # blue belongs on the side opposite red's
        read = [x.sum(axis)[2 - want] - y.sum(axis)[2 - want]
                for x, y in zip(blue_by[a], blue_by[b], strict=True)]
        print(f"reads {a!r} vs {b!r} at sigma {'/'.join(map(str, BAND))}:"
              f" {' '.join(f'{r:.3f}' for r in read)}")

    # The control: a model that reads named cells puts the red circle's share in the named
    # column (row) from pure noise near 1; one that ignores them, about a third.
    named_x1 = jax.jit(lambda ids, mask, key: clean_at_one(ids, mask, key)[2].mean(0))
    for where, (axis, side) in NAMED.items():
        ids, mask = encode(tok, [named(where)] * N)
        red = shares(np.asarray(named_x1(jnp.asarray(ids), jnp.asarray(mask),
                                         jax.random.key(0))), 0, 2)
        print(f"named cell {where!r}, sigma=1: red share there {red.sum(axis)[side]:.3f}")

    def tokens(s: str) -> jax.Array:
        ids, mask = encode(tok, [s])
        return models.encode_text(p["text"], jnp.asarray(ids), jnp.asarray(mask))[0]

    def distance(a: str, b: str) -> float:
        ta, tb = tokens(a), tokens(b)
        return float(jnp.linalg.norm(ta - tb) / jnp.linalg.norm(ta))

    for a, b in (("to the left of", "to the right of"), ("above", "below")):
        print(f"text encoder: {a!r} vs {b!r}: {distance(prompt(a), prompt(b)):.3f}")
    for a, b in (("at the left", "at the right"), ("at the top", "at the bottom")):
        print(f"text encoder: {a!r} vs {b!r}: {distance(named(a), named(b)):.3f}")


if __name__ == "__main__":
    app.run(main)

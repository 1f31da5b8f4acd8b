"""Run by test_scale.py in a fresh process with 8 fake CPU devices: the same DanceOPD steps on
one device and on several meshes; prints one JSON object with the losses, the parameter
differences, the parameters' shardings and the all-gathers in the compiled steps.

python tests/sharded_steps.py WORKDIR   (needs XLA_FLAGS=--xla_force_host_platform_device_count=8)
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import jax
import numpy as np
from conftest import tiny_config

from danceopd_jax import worlds
from danceopd_jax.core.fields import cfg
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.data.batches import RouteBatcher
from danceopd_jax.train.mesh import make_mesh, put, to_host
from danceopd_jax.train.state import make_optimizer, place_state
from danceopd_jax.train.step import make_danceopd_step
from danceopd_jax.train.student import student_params_fn

SHARDS, BATCH, STEPS = 8, 16, 2
MESHES = {"1": None, "8x1": (8, 1, 1), "2x4": (2, 4, 1), "1x8": (1, 8, 1), "2x2x2": (2, 2, 2)}
KERNEL = ("transformer_blocks", 0, "attn", "to_q", "kernel")


def main(workdir: Path) -> None:
    config = tiny_config(**{"training.batch_size": BATCH})
    world = worlds.build(config, workdir)
    routes, models = world.routes, world.models
    backbone, text = world.init_backbone, world.init_text
    # Random teachers (an edit teacher unlike the anchor, so the loss is not ~0).
    edit = jax.tree.map(lambda x: x * 1.5 + 0.01, backbone)
    frozen = {"teachers": {"anchor": backbone, "joint_edit": edit}, "text": text}
    frozen_axes = {"teachers": {n: models.backbone_axes for n in frozen["teachers"]},
                   "text": models.text_axes}
    tc, d = config.training, config.danceopd
    optimizer = make_optimizer(tc.lr, 0.0, tc.grad_clip, 0)
    batcher = RouteBatcher({r.bucket: world.train(r.bucket) for r in routes}, routes,
                           "per_sample", BATCH, config.training.seed, SHARDS)
    field = models.field()
    out = {}
    for name, sizes in MESHES.items():
        mesh = (make_mesh({"data": 1}, jax.devices()[:1]) if sizes is None else
                make_mesh(dict(zip(("data", "fsdp", "tensor"), sizes, strict=True))))
        trainable = {"backbone": jax.tree.map(np.array, backbone)}
        state, placed, sh = place_state(mesh, trainable, models.trainable_axes(trainable),
                                        frozen, frozen_axes, optimizer, config.training.seed)
        step = make_danceopd_step(field, student_params_fn(0.0),
                                  [cfg(field, r.cfg_alpha) for r in routes],
                                  [r.teacher for r in routes], models.conditioner(), optimizer,
                                  make_sigmas(d.num_steps, d.shift, d.schedule), d.query_k,
                                  d.query_bias, SHARDS, sh)
        losses, hlo = [], ""
        for s in range(STEPS):
            slots, batch = batcher(s)
            batch = put(jax.tree.map(lambda x: x[None], batch), sh.batches)  # one step a call
            if s == 0:
                hlo = step.lower(state, placed, batch, slots).compile().as_text()
            state, m = step(state, placed, batch, slots)
            losses.append(float(m["loss"][0]))
        kernel = state.trainable["backbone"]
        moment = state.opt_state[1][0].mu["backbone"]
        for k in KERNEL:
            kernel, moment = kernel[k], moment[k]
        out[name] = {
            "losses": losses,
            "params": jax.tree.map(np.asarray, to_host(state.trainable)),
            "kernel_spec": str(kernel.sharding.spec), "moment_spec": str(moment.sharding.spec),
            "kernel_shard_shape": list(kernel.addressable_shards[0].data.shape),
            # Output sizes (elements) of every all-gather in the compiled step.
            "all_gathers": [math.prod(int(d) for d in dims.split(",") if d) for dims in
                            re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)],
        }
    base = out["1"]["params"]
    report = {}
    for name, r in out.items():
        diff = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), r["params"],
                                            base))
        report[name] = {**{k: v for k, v in r.items() if k != "params"},
                        "max_param_diff": max(diff)}
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

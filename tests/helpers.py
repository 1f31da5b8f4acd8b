"""Helpers shared by several test modules (fixtures and configs stay in conftest.py): workdirs
with trained teachers, command lines run as `python -m` runs them (cheaply), and the parity
helpers against PyTorch models (torch and diffusers imported lazily, so importing this module
costs nothing to a test that does not use them)."""

from __future__ import annotations

import functools
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.models.mmdit import MMDiT, MMDiTConfig

ROOT = Path(__file__).resolve().parent.parent
# Weights ~ N(0, STD), norm weights ~ 1 + N(0, STD): no layer is zero or identity. Much larger
# weights amplify float32 rounding of the sin/cos time features (timestep up to 1000) past TOL.
STD = 0.2
TOL = 1e-4
B, L, H, W = 2, 5, 8, 6  # W < sample_size: exercises the centre crop of the position table
SD3 = {
    "sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 3,
    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 12,
    "caption_projection_dim": 16, "pooled_projection_dim": 10, "pos_embed_max_size": 6,
}
# MMDiT-X: dual attention in the first block and in the last (context_pre_only) one.
SD35 = {**SD3, "dual_attention_layers": (0, 2), "qk_norm": "rms_norm"}


def random_like(name: str, shape: tuple[int, ...], rng: np.random.Generator,
                std: float = STD) -> np.ndarray:
    noise = std * rng.standard_normal(shape).astype(np.float32)
    is_norm_weight = len(shape) == 1 and name.endswith(("weight", "scale"))
    return 1 + noise if is_norm_weight else noise


def randomize(model: Any, seed: int = 0, std: float = STD) -> Any:
    """Every parameter of a torch module randomised (random_like: 1-D weights around 1, as a
    norm's scale), so that parity covers every weight: default inits (zero biases, unit norm
    weights) would hide dropped or swapped keys. Returns the module in eval mode."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(random_like(name, tuple(p.shape), rng, std)))
    return model.eval()


def with_params(factory: Callable[[], nnx.Module], params: dict) -> nnx.Module:
    """Build abstractly (no init ops to run), then fill in the converted params."""
    graph, state = nnx.split(nnx.eval_shape(factory))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graph, state)


def torch_sd3(kwargs: dict, seed: int = 0) -> Any:
    """A diffusers SD3Transformer2DModel with every parameter randomised."""
    from diffusers import SD3Transformer2DModel

    return randomize(SD3Transformer2DModel(**kwargs), seed)


def sd3_inputs(config: MMDiTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "z": rng.standard_normal((B, H, W, config.in_channels), np.float32),
        "sigma": rng.uniform(0, 1, B).astype(np.float32),
        "text": rng.standard_normal((B, L, config.joint_attention_dim), np.float32),
        "pooled": rng.standard_normal((B, config.pooled_projection_dim), np.float32),
    }


def torch_sd3_forward(model: Any, x: dict[str, np.ndarray]) -> np.ndarray:
    """diffusers' forward on our inputs: NCHW, timestep = 1000 * sigma; back to NHWC."""
    import torch

    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x["z"].transpose(0, 3, 1, 2).copy()),
            encoder_hidden_states=torch.from_numpy(x["text"]),
            pooled_projections=torch.from_numpy(x["pooled"]),
            timestep=torch.from_numpy(1000 * x["sigma"]),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef: nnx.GraphDef, state: nnx.State, x: dict[str, jax.Array]) -> jax.Array:
    cond = {"text": x["text"], "pooled": x["pooled"],
            "text_mask": x.get("text_mask", jnp.ones(x["text"].shape[:2], bool)),
            **{k: x[k] for k in ("source", "has_source") if k in x}}
    return nnx.merge(graphdef, state)(x["z"], x["sigma"], cond)


def mmdit_forward(config: MMDiTConfig, params: dict, x: dict[str, np.ndarray]) -> np.ndarray:
    """Our MMDiT with the given params on sd3_inputs-style inputs (optionally with
    "text_mask", and "source" with "has_source")."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return np.asarray(_apply(graphdef, state, x))


def max_err(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def tensorboard_tags(logdir: Path) -> dict[str, set[int]]:
    """{tag: the steps it was written at} over the TensorBoard event files under `logdir`
    (TFRecords of Event protos: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    tags: dict[str, set[int]] = {}
    for path in logdir.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            size = int.from_bytes(data[at:at + 8], "little")
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + size])
            at += 12 + size + 4
            for value in event.summary.value:
                tags.setdefault(value.tag, set()).add(event.step)
    return tags


def workdir_with_teachers(trained: tuple[Path, dict], path: Path) -> Path:
    path.mkdir()
    for sub in ("teachers", "data"):
        shutil.copytree(trained[0] / sub, path / sub)
    return path


def run_clis(cases: list[dict], env: dict | None = None, timeout: int = 600
             ) -> list[tuple[int, str]]:
    """(exit status, stdout + stderr) of each case {"argv": [module, *args], "prelude": code
    run first (fault injection)}, run as `python -m module args` would be: each in a process
    forked from one driver that imported the heavy libraries once (a fresh interpreter per
    command line spends seconds on imports). A child killed by signal N gives -N."""
    out = subprocess.run([sys.executable, __file__], input=json.dumps(cases), cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {}),
                              "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    return [tuple(r) for r in json.loads(out.stdout.splitlines()[-1])]


def _drive() -> None:
    # What every command line imports (no module that defines flags: each child does that).
    import flax.nnx  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    from ml_collections import config_flags  # noqa: F401

    import danceopd_jax.jobs.distill  # noqa: F401
    import danceopd_jax.jobs.workdir  # noqa: F401

    results = []
    for case in json.load(sys.stdin):
        with tempfile.TemporaryFile() as log:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                os._exit(_child(case))
            _, status = os.waitpid(pid, 0)
            log.seek(0)
            results.append((os.waitstatus_to_exitcode(status), log.read().decode()))
    print(json.dumps(results))


def _child(case: dict) -> int:
    module, *args = case["argv"]
    sys.argv = [module, *args]
    try:
        exec(case.get("prelude", ""), {})  # noqa: S102 - the test's own fault injection
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 - an uncaught error, as the interpreter shows it
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    _drive()

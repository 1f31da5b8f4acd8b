"""Scale-out on this CPU: meshes of 8 fake devices, two real processes over localhost, and
preemption (SIGTERM) with exact resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE, ROOT, losses, tiny_config, tiny_flags
from helpers import workdir_with_teachers
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from danceopd_jax.core import methods
from danceopd_jax.core.routing import Route, Slot
from danceopd_jax.data.batches import RouteBatcher
from danceopd_jax.jobs import distill
from danceopd_jax.train.checkpoint import RunCheckpoints
from danceopd_jax.train.loop import Preempted
from danceopd_jax.train.mesh import MESH_AXES, logical_sharding, mesh_shape

TESTS = Path(__file__).resolve().parent


# --- mesh and rules -------------------------------------------------------------------------

def test_mesh_sizes_resolve_the_rest_and_bad_sizes_fail():
    assert mesh_shape({"data": -1}, 8) == (8, 1, 1)
    assert mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4, 1)
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    for sizes, match in [({"data": 3}, "needs 3 devices"), ({"data": -1, "fsdp": -1}, "at most"),
                         ({"model": 2}, "unknown"), ({"data": 0}, "positive"),
                         ({"data": -1, "fsdp": 3}, "do not divide")]:
        with pytest.raises(ValueError, match=match):
            mesh_shape(sizes, 8)


def test_rules_table_maps_logical_axes_to_mesh_axes():
    mesh = AbstractMesh((2, 4, 2), MESH_AXES)
    assert logical_sharding(mesh, P("embed", "heads"), (32, 32)).spec == P("fsdp", "tensor")
    assert logical_sharding(mesh, P("mlp", "embed"), (64, 32)).spec == P("tensor", "fsdp")
    # Split once per mesh axis; a dimension the axis does not divide stays whole.
    assert logical_sharding(mesh, P("embed", "embed"), (32, 32)).spec == P("fsdp", None)
    assert logical_sharding(mesh, P(None, "embed"), (3, 30)).spec == P(None, None)
    assert logical_sharding(mesh, P(), (32,)).spec == P(None)


def test_batches_tile_slots_inside_every_shard_and_each_process_builds_its_own():
    n = 12
    rows = {"target": np.zeros((n, 4, 4, 3), np.uint8), "input_ids": np.zeros((n, 2), np.int32),
            "attention_mask": np.ones((n, 2), bool)}
    t2i = {**rows, "source": rows["target"], "has_source": np.zeros(n, bool)}
    edit = {**t2i, "has_source": np.ones(n, bool)}
    routes = [Route("a", "anchor", "t2i", 0.25), Route("b", "edit", "edit", 0.75)]
    batcher = RouteBatcher({"t2i": t2i, "edit": edit}, routes, "per_sample", 16, 0, shards=2)
    slots, batch = batcher(3)
    assert slots == (Slot(0, 0, 2), Slot(1, 2, 8))  # per shard of 8 rows
    assert batch["has_source"].tolist() == [False] * 2 + [True] * 6 + [False] * 2 + [True] * 6
    _, second = batcher(3, range(1, 2))  # what process 1 of 2 builds: shard 1 only
    assert all(np.array_equal(second[k], batch[k][8:]) for k in batch)
    with pytest.raises(ValueError, match="multiple of the mesh"):
        RouteBatcher({"t2i": t2i, "edit": edit}, routes, "per_sample", 15, 0, shards=2)


def test_routed_velocity_takes_each_slot_from_every_shard():
    def teacher(offset):
        return lambda params, z, sigma, cond: z * 0 + offset + cond["id"][:, None]

    z = jnp.zeros((8, 1))
    ids = jnp.arange(8.0)
    v = methods.routed_velocity([teacher(100.0), teacher(200.0)], [None, None],
                                (Slot(0, 0, 1), Slot(1, 1, 4)), z, jnp.zeros(8), {"id": ids},
                                shards=2)
    assert v[:, 0].tolist() == [100, 201, 202, 203, 104, 205, 206, 207]
    with pytest.raises(ValueError, match="same number of shards"):
        methods.routed_velocity([teacher(0.0)], [None], (Slot(0, 0, 4),), z, jnp.zeros(8),
                                {"id": ids}, shards=1)


# --- 8 fake devices -------------------------------------------------------------------------

@pytest.mark.slow
def test_sharded_steps_equal_the_one_device_step(tmp_path):
    """Two DanceOPD steps on meshes (data, fsdp[, tensor]) = (8,1), (2,4), (1,8), (2,2,2) give
    the one-device losses and parameters; parameters and Adam moments are split as the rules
    say; with replicated parameters (8,1) no all-gather moves anything batch-sized."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"}
    out = subprocess.run([sys.executable, str(TESTS / "sharded_steps.py"), str(tmp_path)],
                         cwd=TESTS, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    base = report["1"]
    assert base["losses"][0] > 1e-4  # a real loss, not ~0
    for name in ("8x1", "2x4", "1x8", "2x2x2"):
        r = report[name]
        np.testing.assert_allclose(r["losses"], base["losses"], rtol=1e-5, err_msg=name)
        assert r["max_param_diff"] < 1e-6, name
        assert r["moment_spec"] == r["kernel_spec"], name
    assert report["8x1"]["kernel_spec"] == "P(None, None)"
    assert report["2x4"]["kernel_spec"] == report["1x8"]["kernel_spec"] == "P('fsdp', None)"
    assert report["1x8"]["kernel_shard_shape"] == [6, 48]  # [48, 48] query kernel, rows over 8
    assert report["2x2x2"]["kernel_spec"] == "P('fsdp', 'tensor')"
    latents = 16 * 12 * 12 * 3  # the batch's images: never gathered
    assert max(report["8x1"]["all_gathers"], default=0) < latents


# --- real processes -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main_cmd(workdir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "danceopd_jax.main", "--config=configs/t2i_edit.py",
            f"--workdir={workdir}", *tiny_flags(), "--config.training.sample_every=0", *flags]


def env_with(devices: int = 1) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}


@pytest.mark.slow
def test_two_processes_match_one_process_survive_sigterm_and_restore_in_one(trained, tmp_path):
    """Two processes (one CPU device each) over localhost train until process 1 gets SIGTERM:
    both save the same step and exit with the preemption status 42. Their losses equal a single
    process's on the same global batch (2 devices), and one process on one device resumes the
    checkpoint."""
    two = workdir_with_teachers(trained, tmp_path / "two")
    port = free_port()
    procs = [subprocess.Popen(
        main_cmd(two, "--config.training.steps=10000", "--config.training.checkpoint_every=0",
                 f"--coordinator_address=localhost:{port}", "--num_processes=2",
                 f"--process_id={i}"),
        cwd=ROOT, env=env_with(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    deadline = time.time() + 300
    log = two / "metrics.jsonl"
    while (log.read_text().count("\n") if log.exists() else 0) < 3:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no progress"
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [42, 42], logs[0][-3000:] + logs[1][-3000:]
    saved = RunCheckpoints(two / "checkpoints").latest_step()
    assert saved is not None and saved >= 3
    assert all(f"saved a checkpoint at step {saved}" in log for log in logs)

    one = workdir_with_teachers(trained, tmp_path / "one")
    out = subprocess.run(main_cmd(one, f"--config.training.steps={saved}"), cwd=ROOT,
                         env=env_with(2), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    two_losses, one_losses = losses(two), losses(one)
    assert sorted(two_losses) == sorted(one_losses) == list(range(1, saved + 1))
    np.testing.assert_allclose([two_losses[s] for s in sorted(two_losses)],
                               [one_losses[s] for s in sorted(one_losses)], rtol=1e-6)

    out = subprocess.run(main_cmd(two, f"--config.training.steps={saved + 2}"), cwd=ROOT,
                         env=env_with(1), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from checkpoint step {saved}" in out.stderr
    assert sorted(losses(two)) == list(range(1, saved + 3))
    assert RunCheckpoints(two / "checkpoints").latest_step() == saved + 2


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(trained, tmp_path, monkeypatch):
    """SIGTERM arrives while step 3 is prepared: the run saves step 3 and stops; the next start
    resumes there, and every loss equals the uninterrupted run's. (One step per call, so that
    step 3 ends a call: a run notices the signal when a call ends.)"""
    workdir = workdir_with_teachers(trained, tmp_path / "run")
    real_update = distill.method_update

    def preempt_at_step_3(*args, **kwargs):  # in the main loop (batches are built ahead)
        update = real_update(*args, **kwargs)

        def step(state, batch, slots):
            if int(state.step) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return update(state, batch, slots)
        return step

    with monkeypatch.context() as patch:
        patch.setattr(distill, "method_update", preempt_at_step_3)
        with pytest.raises(Preempted, match="step 3"):
            distill.run(tiny_config(**{"training.steps_per_call": 1}), workdir)
    assert RunCheckpoints(workdir / "checkpoints").latest_step() == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is removed
    distill.run(tiny_config(), workdir)
    assert losses(workdir) == losses(trained[0])


# --- memory on paper ------------------------------------------------------------------------

def test_memory_table_counts_the_real_parameters_and_splits_them_by_the_rules():
    from flax import nnx

    from danceopd_jax.jobs.memory import F32, Hardware, Workload, memory_table
    from danceopd_jax.models.mmdit import MMDiT, param_count, tiny_config

    config = tiny_config(image_size=16, patch_size=2, width=64, depth=2, heads=4)
    workload = Workload(image_size=16, vae_factor=1, text_tokens=8, teachers=2, lora_rank=4)
    one = Hardware("one", 1, 80.0, {"data": 1})
    eight = Hardware("eight", 8, 80.0, {"fsdp": 8})
    full1 = memory_table(config, one, workload, "full")
    full8 = memory_table(config, eight, workload, "full")
    lora8 = memory_table(config, eight, workload, "lora")
    assert full1["params_total"] == param_count(MMDiT(config, rngs=nnx.Rngs(0)))
    assert full1["student"] == F32 * full1["params_total"]
    assert full1["teachers"] == 2 * full1["student"] and full1["optimizer"] == 2 * full1["grads"]
    # Kernels split 8 ways, biases and norms stay whole: between 1/8 and 1/4 of the total.
    assert full1["student"] / 8 <= full8["student"] < full1["student"] / 4
    assert lora8["teachers"] == full8["teachers"] and lora8["grads"] < full8["grads"] / 2
    # 2 x 64 source+target image tokens + 8 text tokens, remat inputs + one block's working set.
    tokens = 2 * 8 * 8 + 8
    assert full8["tokens"] == tokens
    assert full8["act_per_sample"] == tokens * 64 * (F32 * 2 + 60)
    with pytest.raises(ValueError, match="'lora' or 'full'"):
        memory_table(config, one, workload, "adapter")

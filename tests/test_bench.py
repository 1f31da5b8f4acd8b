"""The benchmark's FLOP count, the full-rollout baseline, the bench command and the PyTorch
peer (on a tiny shape; the real measurement is benchmarks/gpu_side_by_side.sh)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT, load_module, pythonpath_env, tiny_config, tiny_flags
from flax import nnx

from danceopd_jax.core.rollout import rollout_to
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.jobs.bench import backbone_params, config_workload, query_indices
from danceopd_jax.models.mmdit import MMDiT, MMDiTConfig, param_count
from danceopd_jax.train.flops import Shape, danceopd_step_flops, forward_flops, peak_tflops


@pytest.mark.parametrize("dual, with_source, coarse", [((), False, 0), ((0,), True, 0),
                                                     ((), True, 2)])
def test_forward_flops_match_xla_cost_analysis(dual, with_source, coarse):
    """The analytic count is the matrix products; XLA also counts elementwise work, so ours is
    a little lower, never higher."""
    config = MMDiTConfig(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                         num_layers=2, attention_head_dim=32, num_attention_heads=4,
                         joint_attention_dim=64, caption_projection_dim=128,
                         pooled_projection_dim=32, pos_embed_max_size=8,
                         dual_attention_layers=dual, qk_norm="rms_norm", coarse_scale=coarse)
    graph, params = nnx.split(MMDiT(config, rngs=nnx.Rngs(0)))
    b, t = 2, 8
    z = jnp.zeros((b, 16, 16, 4))
    cond = {"text": jnp.zeros((b, t, 64)), "text_mask": jnp.ones((b, t), bool),
            "pooled": jnp.zeros((b, 32))}
    if with_source:
        cond |= {"source": z, "has_source": jnp.ones(b, bool)}
    forward = jax.jit(lambda p, z, c: nnx.merge(graph, p)(z, jnp.zeros(b), c))
    cost = forward.lower(params, z, cond).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = forward_flops(config, Shape(b, 64, t, with_source))
    assert 0.9 * xla < ours <= xla


def test_step_flops_count_rollout_teachers_and_student():
    config = MMDiTConfig(num_layers=2)
    shape = Shape(4, 64, 8, True)
    f = forward_flops(config, shape)
    f4 = forward_flops(config, Shape(16, 64, 8, True))
    step = danceopd_step_flops(config, shape, rollout_forwards=5, query_k=4, cfg_passes=2)
    assert (step.rollout, step.teachers, step.student) == (5 * f, 2 * f4, 3 * f4)
    assert step.total == 5 * f + 5 * f4
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("cpu") is None


def test_full_rollout_reaches_the_same_states_with_all_n_forwards():
    def field(params, z, sigma, cond):
        return params * z + sigma[:, None]

    z0 = jnp.arange(6.0).reshape(3, 2)
    sigmas = make_sigmas(8, 1.0, "clean")
    stop = jnp.array([[2], [5], [1]])
    early, n_early, _ = rollout_to(field, 0.3, z0, sigmas, {}, stop)
    full, n_full, forwards = rollout_to(field, 0.3, z0, sigmas, {}, stop, rollout="full")
    assert (int(n_early), int(n_full), float(forwards)) == (5, 8, 8.0)
    assert jnp.array_equal(early, full)


# The tiny config with the paper's query (N = 4 here), so the bench has its shared-query row.
PAPER_QUERY = ["--config.danceopd.query_k=1", "--config.danceopd.query_bias=low",
               "--config.danceopd.shared_query=false"]


@pytest.mark.slow
def test_bench_command_compares_the_variants(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "danceopd_jax.bench", "--config",
                          "configs/t2i_edit.py", *tiny_flags(), *PAPER_QUERY, "--timed_steps=2",
                          "--warmup=1", f"--out={out}"], cwd=ROOT, env=pythonpath_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| DanceOPD N=4 K=1 low, rollout stops at the query |" in run.stdout
    (work,) = json.loads(out.read_text())["workloads"]
    assert work["workload"]["num_steps"] == 4 and work["workload"]["batch"] == 4
    rows = {r["variant"].split(",")[-1].strip(): r for r in work["results"]}
    stop, full = rows["rollout stops at the query"], rows["full rollout (reference)"]
    assert full["rollout_forwards"] == 4 >= stop["rollout_forwards"]  # N = 4 in the tiny config
    whole = rows["the whole batch rolls out to the largest index"]
    assert whole["rollout_steps"] == stop["rollout_steps"] == whole["rollout_forwards"]
    assert stop["rollout_forwards"] < whole["rollout_forwards"]  # only the rows still moving
    shared = rows["one query index per step"]
    assert shared["rollout_forwards"] <= 3  # the one index of the step, at most N - 1
    dense = next(r for k, r in rows.items() if k.startswith("dense"))
    assert dense["flops_per_step"] > 2 * stop["flops_per_step"]  # 4 queries vs 1
    flow = next(r for r in work["results"] if r["variant"].startswith("Flow-OPD"))
    assert flow["rollout_forwards"] == 4  # every SDE step, then all 4 transitions
    assert flow["flops_per_step"] >= dense["flops_per_step"]
    assert all(r["step_s"] > 0 and r["compile_s"] > 0 for r in work["results"])
    assert work["student_fwd_bwd"]["tflops"] > 0


@pytest.mark.slow
def test_bench_rows_times_only_the_first_variants(tmp_path):
    """--rows=1 times the config's own DanceOPD step alone (how models are compared), and the
    report names the backbone's size: the count a built model of the config has."""
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "danceopd_jax.bench", "--config",
                          "configs/t2i_edit.py", *tiny_flags(), *PAPER_QUERY, "--timed_steps=1",
                          "--warmup=1", "--rows=1", f"--out={out}"], cwd=ROOT,
                         env=pythonpath_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (work,) = json.loads(out.read_text())["workloads"]
    assert [r["variant"] for r in work["results"]] == [
        "DanceOPD N=4 K=1 low, rollout stops at the query"]
    model = config_workload(tiny_config()).model
    count = param_count(MMDiT(model, rngs=nnx.Rngs(0)))
    assert work["backbone_params"] == backbone_params(model) == count
    assert f"backbone {count:,} params" in run.stdout


def test_steps_per_call_benchmark_runs_the_same_steps_per_setting(tmp_path):
    """benchmarks/steps_per_call.py times the same steps at each setting (so the same rollout
    lengths) and reports the kernel's share per step; a setting that does not divide the steps
    is refused."""
    out = tmp_path / "spc.json"
    flags = ["--config", "configs/t2i_edit.py", *tiny_flags(), "--steps=4", "--warmup=2",
             "--rounds=1"]
    run = subprocess.run([sys.executable, "benchmarks/steps_per_call.py", *flags,
                          "--per_call=1,2", f"--json={out}"], cwd=ROOT, env=pythonpath_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = json.loads(out.read_text())["rows"]
    assert (one["steps_per_call"], two["steps_per_call"]) == (1, 2)
    assert one["rollout_forwards"] == two["rollout_forwards"]
    assert all(r["step_s"] > 0 and r["user_ms"] > 0 and r["system_ms"] >= 0
               and r["minor_faults"] >= 0 for r in (one, two))
    bad = subprocess.run([sys.executable, "benchmarks/steps_per_call.py", *flags,
                          "--per_call=1,3"], cwd=ROOT, env=pythonpath_env(),
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--per_call=[3]" in bad.stderr + bad.stdout


@pytest.mark.slow
def test_torch_peer_runs_the_same_step_on_diffusers(tmp_path):
    """The peer reads the workload from the same config and draws our step's query indices;
    it runs the config's K = 2 stratified shared query here."""
    pytest.importorskip("diffusers")
    out = tmp_path / "peer.json"
    flags = ["--config", "configs/t2i_edit.py", *tiny_flags(), "--config.danceopd.query_k=2",
             "--config.danceopd.query_bias=stratified", "--config.danceopd.shared_query=true"]
    run = subprocess.run([sys.executable, "benchmarks/torch_peer.py", *flags,
                          "--modes=batched,reference-loop,fwd-bwd", "--timed_steps=2", "--warmup=1",
                          f"--out={out}"], cwd=ROOT, env=pythonpath_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (work,) = json.loads(out.read_text())["workloads"]
    spec = config_workload(tiny_config(**{"danceopd.query_k": 2, "danceopd.query_bias":
                                           "stratified", "danceopd.shared_query": True}))
    assert work["workload"] == json.loads(json.dumps(spec.spec()))
    modes = {r["mode"]: r for r in work["results"]}
    assert modes["reference-loop"]["rollout_steps"] == [4] * 2  # every sample's N = 4 steps
    # The loop steps our step would run at steps 1 and 2 (after one warm-up): max index.
    assert modes["batched"]["rollout_steps"] == [int(query_indices(spec, i).max())
                                                 for i in (1, 2)]
    assert all(r["samples_per_s"] > 0 for r in work["results"])


def _bench_json(workload: dict, steps: float) -> dict:
    return {"device": "cpu", "jax": "x", "preset": "toy", "workloads": [{
        "image_size": workload["image_size"], "batch": workload["batch"], "workload": workload,
        "results": [{"variant": "DanceOPD", "samples_per_s": 1.0, "step_s": 1.0,
                     "rollout_forwards": 0.8 * steps, "rollout_steps": steps},
                    {"variant": "dense K=N", "samples_per_s": 0.2, "step_s": 5.0,
                     "rollout_forwards": steps, "rollout_steps": steps}],
        "student_fwd_bwd": {"seconds": 0.1, "tflops": 0.01}}]}


def _peer_json(workload: dict, loop_steps: list[int]) -> dict:
    return {"device": "cpu", "torch": "x", "preset": "toy", "workloads": [{
        "image_size": workload["image_size"], "batch": workload["batch"], "workload": workload,
        "results": [{"mode": "batched", "samples_per_s": 0.8, "step_s": 1.2,
                     "rollout_steps": loop_steps}]}]}


def test_compare_refuses_different_workloads(tmp_path, capsys):
    """compare.py prints ratios only for the same workload, and names what differs."""
    compare = load_module(ROOT / "benchmarks" / "compare.py")
    work = json.loads(json.dumps(config_workload(tiny_config()).spec()))
    cases = {"same": (work, [3, 4]),
             "n": ({**work, "num_steps": 8}, [3, 4]),
             "batch": ({**work, "batch": 8}, [3, 4]),
             "loop steps": (work, [6, 7])}
    for name, (peer_work, loop_steps) in cases.items():
        ours, peer = tmp_path / f"ours_{name}.json", tmp_path / f"peer_{name}.json"
        ours.write_text(json.dumps(_bench_json(work, 3.5)))
        peer.write_text(json.dumps(_peer_json(peer_work, loop_steps)))
        if name == "same":
            compare.main(str(ours), str(peer))
            assert "(ours 1.25x)" in capsys.readouterr().out
            continue
        with pytest.raises(SystemExit) as refused:
            compare.main(str(ours), str(peer))
        field = {"n": "num_steps: 4 vs 8", "batch": "batch: 4 vs 8",
                 "loop steps": "rollout steps per step: 3.50 vs 6.50"}[name]
        assert field in str(refused.value)
        assert "(ours" not in capsys.readouterr().out

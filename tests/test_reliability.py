"""Fault injection: what goes wrong in real runs, and what the user sees then. Concurrent jobs
on one workdir, a learning rate that blows up (and the suggested rerun, run), SIGKILL in the
middle of a save and SIGTERM, a corrupt newest checkpoint, an export over an existing one,
metrics after resume, and every command line's bad inputs (one paragraph, no traceback, a
documented exit status)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import losses, tiny_config, tiny_flags
from helpers import run_clis, workdir_with_teachers
from PIL import Image

from danceopd_jax import cli
from danceopd_jax.core.errors import (
    EXIT_DATA,
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    CheckpointError,
    ConfigError,
)
from danceopd_jax.jobs import distill
from danceopd_jax.train.checkpoint import RunCheckpoints
from danceopd_jax.train.lock import LOCK_FILE, WorkdirLock, WorkdirLocked
from danceopd_jax.train.loop import MetricsWriter, unsound

MAIN = "danceopd_jax.main"


def main_args(workdir: Path, *extra: str) -> list[str]:
    return [MAIN, f"--workdir={workdir}", *tiny_flags(), "--config.eval.final_scores=false",
            *extra]


def no_traceback(output: str) -> bool:
    return "Traceback" not in output


# --- the workdir lock -----------------------------------------------------------------------

def test_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path, caplog):
    holder = WorkdirLock(tmp_path)
    holder.acquire()
    with pytest.raises(WorkdirLocked, match=rf"pid {os.getpid()} on .*started 20"):
        WorkdirLock(tmp_path).acquire()
    holder.release()
    assert not (tmp_path / LOCK_FILE).exists()

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"host": holder.holder["host"], "pid": dead.pid, "start": "x"}))
    taker = WorkdirLock(tmp_path)
    taker.acquire()  # same host, dead pid: stale however fresh its heartbeat
    assert "taking over the stale lock" in caplog.text and "process is gone" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taker.release()

    other = {"host": "elsewhere", "pid": 1, "start": "x"}
    lock.write_text(json.dumps(other))  # another host, fresh heartbeat: live
    with pytest.raises(WorkdirLocked, match="pid 1 on elsewhere"):
        WorkdirLock(tmp_path).acquire()
    old = time.time() - 1000
    os.utime(lock, (old, old))  # another host, no heartbeat for 1000 s: stale
    taker = WorkdirLock(tmp_path, heartbeat_s=0.05)
    taker.acquire()
    os.utime(lock, (old, old))
    time.sleep(0.3)
    assert time.time() - lock.stat().st_mtime < 5  # the holder's heartbeat refreshed it
    lock.write_text(json.dumps(other))  # taken over meanwhile: release leaves it alone
    taker.release()
    assert json.loads(lock.read_text()) == other


def test_a_second_job_refuses_at_once_and_touches_nothing(tmp_path):
    holder = WorkdirLock(tmp_path)
    holder.acquire()
    try:
        with pytest.raises(WorkdirLocked, match="in use by another job"):
            distill.run(tiny_config(), tmp_path)
    finally:
        holder.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no config.json, no checkpoints


# --- soundness, metrics, validation, export staging (no training) ---------------------------

def test_sound_means_finite_and_bounded_growth():
    params = {"a": jnp.ones((3,)), "b": {"c": jnp.full((4,), 2.0)}}
    norm = float(np.sqrt(3 + 16))
    assert unsound(params, norm, 4.0) == (None, pytest.approx(norm))
    grown = {"a": 5 * params["a"], "b": {"c": 5 * params["b"]["c"]}}
    why, _ = unsound(grown, norm, 4.0)
    assert "grew" in why and "max_param_growth=4" in why
    assert unsound(grown, norm, 0.0)[0] is None  # 0: finite weights only
    assert unsound(grown, norm, 6.0)[0] is None
    bad = {"a": jnp.array([1.0, jnp.nan, 1.0]), "b": params["b"]}
    assert "NaN" in unsound(bad, norm, 0.0)[0]


def test_metrics_are_cut_back_to_the_restored_step(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    for phase, step in [("t", 1), ("danceopd", 1), ("danceopd", 2), ("danceopd", 3), ("t", 9)]:
        writer.write({"phase": phase, "step": step})
    writer.cut("danceopd", 2)
    rows = [json.loads(r) for r in writer.path.read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in rows] == [("t", 1), ("danceopd", 1),
                                                       ("danceopd", 2), ("t", 9)]


@pytest.mark.parametrize("overrides, match", [
    ({"training.steps": 0}, "training.steps=0"),
    ({"training.steps": -5}, "training.steps=-5"),
    ({"training.batch_size": 1}, "batch_size=1 cannot hold one sample of each of the 2 routes"),
])
def test_runs_that_cannot_work_are_refused_before_any_work(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        distill.run(tiny_config(**overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fewer_steps_than_the_checkpoint_is_refused(trained, tmp_path):
    shutil.copytree(trained[0] / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "config.json").write_text("as before")
    with pytest.raises(ConfigError, match="checkpoint at step 4, past training.steps=2"):
        distill.run(tiny_config(**{"training.steps": 2}), tmp_path)
    assert (tmp_path / "config.json").read_text() == "as before"
    assert not (tmp_path / LOCK_FILE).exists()


def test_sample_inputs_must_fit_the_world(tmp_path):
    from danceopd_jax.data.shapes.tokenizer import load_tokenizer, unknown_words
    from danceopd_jax.eval.shapes import read_source

    tok = load_tokenizer()
    assert unknown_words(tok, "a purple elephant, please") == ["elephant", ",", "please"]
    assert unknown_words(tok, "remove the red circle") == []
    rgb = np.arange(12 * 12 * 3, dtype=np.uint8).reshape(12, 12, 3)
    Image.fromarray(rgb).save(tmp_path / "ok.png")
    np.testing.assert_array_equal(read_source(str(tmp_path / "ok.png"), 12, False), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.new("RGB", (100, 37)).save(tmp_path / "big.png")
    Image.new("RGBA", (12, 12)).save(tmp_path / "alpha.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="mode L, not RGB; pass --resize"):
        read_source(str(tmp_path / "gray.png"), 12, False)
    assert read_source(str(tmp_path / "gray.png"), 12, True).shape == (12, 12, 3)
    with pytest.raises(ConfigError, match="100x37 pixels, not the world's 12x12"):
        read_source(str(tmp_path / "big.png"), 12, False)
    assert read_source(str(tmp_path / "big.png"), 12, True).shape == (12, 12, 3)
    for resize in (False, True):
        with pytest.raises(ConfigError, match="alpha channel"):
            read_source(str(tmp_path / "alpha.png"), 12, resize)
    with pytest.raises(ConfigError, match="not a readable image"):
        read_source(str(tmp_path / "junk.png"), 12, True)


def test_export_replaces_the_folder_whole_or_not_at_all(tmp_path):
    from danceopd_jax.jobs.export import staged

    out = tmp_path / "model"
    out.mkdir()
    (out / "old_weights.bin").write_text("old")
    (out / "unrelated.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="disk full"), staged(out) as partial:
        partial.mkdir()
        (partial / "half.bin").write_text("half")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in out.iterdir()) == ["old_weights.bin", "unrelated.txt"]
    with staged(out) as partial:
        partial.mkdir()
        (partial / "new_weights.bin").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new_weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left beside it
    with staged(tmp_path / "lora.safetensors") as partial:
        assert partial.suffix == ".safetensors"
        partial.write_text("lora")
    assert (tmp_path / "lora.safetensors").read_text() == "lora"


# --- checkpoints: corrupt, killed mid-save, preempted ----------------------------------------

@pytest.mark.slow
def test_corrupt_newest_checkpoint_names_the_fix_and_the_run_resumes_after_it(trained,
                                                                            tmp_path):
    workdir = workdir_with_teachers(trained, tmp_path / "run")
    shutil.copytree(trained[0] / "checkpoints", workdir / "checkpoints")
    for f in (workdir / "checkpoints" / "4").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"step 4 .* delete .*checkpoints/4") as err:
        distill.run(tiny_config(), workdir)
    assert err.value.exit_code == EXIT_DATA
    shutil.rmtree(workdir / "checkpoints" / "4")
    distill.run(tiny_config(**{"eval.final_scores": False}), workdir)
    assert losses(workdir) == {s: v for s, v in losses(trained[0]).items() if s > 2}


@pytest.mark.slow
def test_sigkill_during_a_save_then_sigterm_then_exact_resume(trained, tmp_path):
    """Killed (SIGKILL) while Orbax writes step 3: the next start takes over the dead job's
    lock, resumes from step 2, and is preempted (SIGTERM) at step 3: exit 42. The last start
    finishes. The losses equal the uninterrupted run's, each step logged once."""
    workdir = workdir_with_teachers(trained, tmp_path / "run")
    kill_in_save = (  # SIGKILL once Orbax has started writing step 3, before it commits
        "import os, signal\n"
        "from danceopd_jax.train.checkpoint import RunCheckpoints\n"
        "save = RunCheckpoints.save\n"
        "def killing_save(self, step, state, meta):\n"
        "    if step == 3:\n"
        "        self._manager.wait_until_finished = lambda: os.kill(os.getpid(), 9)\n"
        "    save(self, step, state, meta)\n"
        "RunCheckpoints.save = killing_save\n")
    term_at_step_3 = (
        "import os, signal\n"
        "from danceopd_jax.data.batches import RouteBatcher\n"
        "batch = RouteBatcher.__call__\n"
        "def preempting(self, step, shard_range=None):\n"
        "    if step == 2:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return batch(self, step, shard_range)\n"
        "RouteBatcher.__call__ = preempting\n")
    args = main_args(workdir, "--config.training.checkpoint_every=1")
    (killed, _), (preempted, log), (done, last) = run_clis(
        [{"argv": args, "prelude": kill_in_save}, {"argv": args, "prelude": term_at_step_3},
         {"argv": args}])
    assert killed == -9
    assert preempted == EXIT_PREEMPTED, log[-3000:]
    assert "taking over the stale lock" in log and "resuming from checkpoint step 2" in log
    assert "preempted: saved a checkpoint at step 3" in log and no_traceback(log)
    assert done == 0 and "resuming from checkpoint step 3" in last, last[-3000:]
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "danceopd"] == [1, 2, 3, 4]
    assert losses(workdir) == losses(trained[0])
    assert not (workdir / LOCK_FILE).exists()


# --- a rate that blows up, and the rerun the message suggests --------------------------------

@pytest.mark.slow
def test_a_blown_up_run_stops_before_saving_and_its_suggested_rerun_recovers(trained, tmp_path):
    """lr=1e6: step 1 moves nothing (warm-up), step 2's weights are finite but exploded. They
    are not saved (not sound), so the suggested command (the config file's rate) resumes from
    step 1 and reproduces the uninterrupted run."""
    workdir = workdir_with_teachers(trained, tmp_path / "run")
    args = main_args(workdir, "--config.training.checkpoint_every=1",
                     "--config.training.lr=1e6", "--config.training.max_to_keep=1")
    ((code, log),) = run_clis([{"argv": args}])
    assert code == EXIT_DIVERGED and no_traceback(log), log[-3000:]
    assert "after step 2 are not sound" in log and "last sound checkpoint is step 1" in log
    assert RunCheckpoints(workdir / "checkpoints").latest_step() == 1
    command = shlex.split(log.split("For example: ")[1].splitlines()[0].split(" (--verbose")[0])
    assert command[:3] == ["python", "-m", MAIN] and not any("lr=" in a for a in command)
    ((code, log),) = run_clis([{"argv": command[2:]}])
    assert code == 0 and "resuming from checkpoint step 1" in log, log[-3000:]
    assert losses(workdir) == losses(trained[0])


# --- every command line's bad inputs: one paragraph, no traceback ---------------------------

def test_every_command_line_explains_bad_inputs_without_a_traceback(trained, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    holder = WorkdirLock(locked)
    holder.acquire()
    export_out = tmp_path / "export"
    export_out.mkdir()
    (export_out / "model.safetensors").write_text("an earlier export")
    workdir = str(trained[0])
    cases = [  # (argv, exit status, what the message says)
        ([MAIN, "--config.training.stepz=3"], EXIT_USAGE, 'did you mean "steps"'),
        ([MAIN, "--config.training.steps=many"], EXIT_USAGE, "'many'"),
        ([MAIN, "stray"], EXIT_USAGE, "unexpected arguments ['stray']"),
        ([MAIN, f"--workdir={locked}", *tiny_flags()], EXIT_DATA,
         f"pid {os.getpid()} on {holder.holder['host']}, started"),
        (["danceopd_jax.sample", f"--workdir={workdir}", "--prompt="], EXIT_USAGE,
         "--unconditional"),
        (["danceopd_jax.sample", f"--workdir={tmp_path / 'none'}", "--prompt=x"], EXIT_DATA,
         "no config.json"),
        (["danceopd_jax.sample", f"--workdir={workdir}", "--prompt=a purple elephant"],
         EXIT_USAGE, "['elephant']"),
        (["danceopd_jax.evaluate", f"--workdir={workdir}", "--models=anchor@cfg-1"], EXIT_USAGE,
         "NAME@cfgALPHA"),
        (["danceopd_jax.export", f"--workdir={workdir}", f"--out={export_out}"], EXIT_USAGE,
         "--overwrite"),
        (["danceopd_jax.prepare", f"--input={tmp_path / 'rows.csv'}", f"--out={tmp_path}",
          "--text_encoders=x", "--vae=x"], EXIT_DATA, "rows.csv not found"),
        (["danceopd_jax.bench", "--config=configs/t2i_edit.py", "--config.model.widht=3"],
         EXIT_USAGE, "did you mean"),
        (["danceopd_jax.reproduce", "--experiments=nope"], EXIT_USAGE, "unknown experiments"),
        (["danceopd_jax.teachers", "--config.teachers.anchor.stpes=1"], EXIT_USAGE,
         "did you mean"),
        (["danceopd_jax.memory", "--hardware=abacus"], EXIT_USAGE, "abacus"),
    ]
    try:
        results = run_clis([{"argv": argv} for argv, _, _ in cases]
                           + [{"argv": [MAIN, "--config.training.steps=0", "--verbose"]}])
    finally:
        holder.release()
    for (argv, status, says), (code, output) in zip(cases, results, strict=False):
        assert (code, no_traceback(output)) == (status, True), (argv, output[-3000:])
        assert says in output, (argv, output[-3000:])
        assert len(output.strip().splitlines()) <= 3, (argv, output)
    assert (export_out / "model.safetensors").read_text() == "an earlier export"
    assert not (locked / "config.json").exists()
    code, output = results[-1]
    assert code == EXIT_USAGE and "Traceback" in output and "training.steps=0" in output


def test_command_lines_restart_once_with_huge_pages(monkeypatch):
    """cli.use_huge_pages: glibc's tunable is added to the environment and the same command line
    restarts; one that already says glibc.malloc.hugetlb (or a restarted one) runs on."""
    restarts = []
    monkeypatch.setattr(os, "execv", lambda exe, argv: restarts.append((exe, argv)))
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "danceopd_jax.main", "--config=c.py"])
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    cli.use_huge_pages()
    assert os.environ["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{cli.HUGE_PAGES}"
    assert restarts == [(sys.executable, [sys.executable, "-m", "danceopd_jax.main",
                                          "--config=c.py"])]
    cli.use_huge_pages()  # the restarted process
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    cli.use_huge_pages()
    assert len(restarts) == 1
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-m", "danceopd_jax.memory", "--no_such_flag"],
                          env=env, capture_output=True, text=True, timeout=120)
    # the restarted command line parses its flags once, in its error boundary
    assert done.returncode == 2 and done.stderr.count("no_such_flag") == 1, done

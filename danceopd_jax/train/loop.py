"""The training loop shared by teacher training and distillation.

It owns everything around the jitted step: batches (each process builds its own shards'
rows), placement on the mesh, checkpoints (periodic, final, on preemption, and exact resume),
non-finite detection, metrics (JSONL) and a progress bar. The device is never waited on except
to read one step's scalars, one step late.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from danceopd_jax.data.batches import Prefetcher
from danceopd_jax.train.checkpoint import RunCheckpoints
from danceopd_jax.train.mesh import local_shards, put_batch
from danceopd_jax.train.state import TrainState

log = logging.getLogger(__name__)

Update = Callable[[TrainState, Any, tuple], tuple[TrainState, dict]]  # (state, batch, slots)
Batcher = Callable[[int, range], tuple[tuple, dict]]  # (step, this process's shards)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the run stopped without saving it."""


class Preempted(Exception):  # noqa: N818 - an event, not an error
    """SIGTERM arrived; a checkpoint of `step` was saved and the run stopped cleanly."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved a checkpoint at step {step}; rerun the same command "
                         "to resume from it.")
        self.step = step


class PreemptionWatch:
    """Notices SIGTERM (a scheduler's preemption notice) during training.

    One process: a signal handler sets a flag, read between steps. Several processes: JAX's
    preemption service (started by jax.distributed.initialize) catches the signal on any host
    and makes every host agree on the same step to save at."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.signalled = False
        self._previous = None
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.signalled = True

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def every(*hooks: tuple[int, Callable[[TrainState, int], None]]
          ) -> tuple[Callable[[TrainState, int], None] | None, int]:
    """Several (interval, callback) hooks as fit's one (on_interval, interval_every): it runs
    at the intervals' greatest common divisor and calls the hooks whose interval divides the
    step. Hooks with interval 0 are off."""
    hooks = tuple((n, fn) for n, fn in hooks if n > 0)
    if not hooks:
        return None, 0

    def on_interval(state: TrainState, step: int) -> None:
        for n, fn in hooks:
            if step % n == 0:
                fn(state, step)

    return on_interval, math.gcd(*(n for n, _ in hooks))


def fit(update: Update, state: TrainState, batcher: Batcher, mesh: Mesh, *, steps: int,
        name: str, checkpoints: RunCheckpoints | None = None, checkpoint_every: int = 0,
        meta: dict | None = None, metrics: MetricsWriter | None = None, log_every: int = 10,
        on_interval: Callable[[TrainState, int], None] | None = None,
        interval_every: int = 0, prefetch: int = 2) -> TrainState:
    """Run `update` from state.step up to `steps`, checkpointing every `checkpoint_every` steps
    and at the end; `on_interval(state, step)` runs every `interval_every` steps (sample grids).
    Batches are built `prefetch` steps ahead on a background thread.
    On SIGTERM it saves a checkpoint and raises Preempted (the next start resumes there).
    Metrics and the progress bar come from process 0 only; every process runs on_interval.
    """
    start = int(state.step)
    lead = jax.process_index() == 0
    shards = local_shards(mesh)
    watch = PreemptionWatch()
    pending: tuple[int, dict] | None = None
    window: list[dict] = []
    last_saved = checkpoints.latest_step() if checkpoints else None
    tick = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc=name, dynamic_ncols=True, mininterval=1.0,
               disable=not lead)

    def settle(step: int, m: dict) -> None:
        """Read step `step`'s scalars; stop on a non-finite loss."""
        nonlocal tick
        m = {k: float(np.asarray(v)) for k, v in jax.device_get(m).items()}
        if not m["finite"]:
            raise NonFiniteLossError(
                f"{name}: the loss became non-finite at step {step + 1} (loss={m['loss']}, "
                f"grad_norm={m['grad_norm']}); that update was not applied and nothing was saved "
                f"after it: the last good checkpoint is step {last_saved}. Lower the learning "
                "rate or check the data, then rerun to resume from it.")
        window.append(m)
        bar.update(1)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            now = time.perf_counter()
            record = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            record.update(step=step + 1, steps_per_sec=len(window) / (now - tick), phase=name)
            record.pop("finite")
            bar.set_postfix(loss=f"{record['loss']:.4g}", sps=f"{record['steps_per_sec']:.2f}")
            if metrics and lead:
                metrics.write(record)
            window.clear()
            tick = now

    # The host builds the next batches while the device runs this step (data/batches.py).
    batches = Prefetcher(batcher, range(start, steps), shards, depth=prefetch)
    try:
        for step in range(start, steps):
            slots, batch = batches.get(step)
            state, m = update(state, put_batch(batch, mesh), slots)
            if pending:
                settle(*pending)
            pending = (step, m)
            done = step + 1
            preempted = watch.reached(done)
            save = checkpoints and (done == steps or preempted or (
                checkpoint_every and done % checkpoint_every == 0))
            if save or (on_interval and interval_every and done % interval_every == 0):
                settle(*pending)  # never save or show a state without checking its loss
                pending = None
            if save:
                checkpoints.save(done, state, {**(meta or {}), "step": done})
                last_saved = done
            if preempted:
                log.warning("%s: SIGTERM received; checkpoint saved at step %d", name, done)
                raise Preempted(done)
            if on_interval and interval_every and done % interval_every == 0:
                on_interval(state, done)
        if pending:
            settle(*pending)
    finally:
        batches.close()
        bar.close()
        watch.close()
    return state

"""The training loop shared by teacher training and distillation.

It owns everything around the jitted steps: batches (each process builds its own shards'
rows), placement on the mesh, checkpoints (periodic, final, on preemption, and exact resume),
non-finite detection, metrics (JSONL) and a progress bar. Each call runs `steps_per_call`
consecutive steps (train/step.consecutive), or one step where a checkpoint, a hook or a change
of routing slots falls inside that span. The device is never waited on except to read one
call's scalars, one call late.
"""

from __future__ import annotations

import collections
import itertools
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
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from danceopd_jax.core.errors import NonFiniteLossError, Preempted
from danceopd_jax.data.batches import Prefetcher
from danceopd_jax.train.checkpoint import RunCheckpoints
from danceopd_jax.train.events import Events
from danceopd_jax.train.mesh import local_shards, put_batches
from danceopd_jax.train.state import TrainState

log = logging.getLogger(__name__)

# (state, the steps' batches stacked, slots) -> (state, metrics stacked over the steps)
Update = Callable[[TrainState, Any, tuple], tuple[TrainState, dict]]
Batcher = Callable[[int, range], tuple[tuple, dict]]  # (step, this process's shards)


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
    """Appends one JSON object per logged step to metrics.jsonl, with the rate of the step's
    update when `rate` (the optimizer's schedule: update count -> rate) is given, and mirrors
    it to TensorBoard when `events` is (train/events.py)."""

    def __init__(self, path: str | Path, rate: Callable[[int], float] | None = None,
                 events: Events | None = None):
        self.path, self.rate, self.events = Path(path), rate, events
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.rate is not None:  # the update that made step s had count s - 1
            record = {**record, "lr": float(self.rate(record["step"] - 1))}
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.events is not None:
            self.events.scalars(record["step"], {k: v for k, v in record.items()
                                                 if k not in ("step", "phase")}, record["phase"])

    def cut(self, phase: str, step: int) -> None:
        """Drop `phase`'s rows after `step`: a resumed run logs them again."""
        if not self.path.exists():
            return
        rows = self.path.read_text().splitlines()
        keep = []
        for row in rows:
            record = json.loads(row)
            if record["phase"] != phase or record["step"] <= step:
                keep.append(row)
        if len(keep) < len(rows):
            self.path.write_text("".join(f"{r}\n" for r in keep))


@jax.jit
def _finite_and_norm(tree: Any) -> tuple[jax.Array, jax.Array]:
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
    return finite, optax.tree.norm(tree)


def unsound(params: Any, reference_norm: float, max_growth: float) -> tuple[str | None, float]:
    """(why `params` are not sound or None, their global norm). Sound: every value is finite
    and, with max_growth > 0, the global norm is at most max_growth x reference_norm (the last
    sound state's). A too-large rate first shows as finite but exploded weights, whose next
    loss is non-finite: saving them would make the rerun fail on them again."""
    finite, norm = (float(x) for x in jax.device_get(_finite_and_norm(params)))
    if not finite:
        return "some values are NaN or inf", norm
    if max_growth > 0 and reference_norm > 0 and norm > max_growth * reference_norm:
        return (f"their global norm grew from {reference_norm:.4g} to {norm:.4g}, more than "
                f"max_param_growth={max_growth:g} times"), norm
    return None, norm


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
        interval_every: int = 0, max_param_growth: float = 0.0,
        prefetch: int = 2, steps_per_call: int = 1) -> TrainState:
    """Run `update` from state.step up to `steps`, checkpointing every `checkpoint_every` steps
    and at the end; `on_interval(state, step)` runs every `interval_every` steps (sample grids).
    Each call of `update` runs `steps_per_call` consecutive steps with the same routing slots
    that cross no checkpoint or hook, or else one step. Batches are built `prefetch` steps ahead on
    a background thread.
    On SIGTERM it saves a checkpoint and raises Preempted (the next start resumes there).
    Metrics and the progress bar come from process 0 only; every process runs on_interval.
    Only sound weights are saved (`unsound`, against the start state and then each save): at
    the first non-finite loss or unsound state it raises NonFiniteLossError, so the newest
    checkpoint is always the last sound one and rotation never deletes it.
    """
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call={steps_per_call}: a call runs at least one step.")
    start = int(state.step)
    lead = jax.process_index() == 0
    shards = local_shards(mesh)
    watch = PreemptionWatch()
    pending: tuple[int, dict] | None = None
    window: list[dict] = []
    last_saved = checkpoints.latest_step() if checkpoints else None
    reference = unsound(state.trainable, 0.0, 0.0)[1] if checkpoints else 0.0
    if metrics and lead:
        metrics.cut(name, start)
    tick = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc=name, dynamic_ncols=True, mininterval=1.0,
               disable=not lead)

    def diverged(what: str) -> NonFiniteLossError:
        resume = (f"the last sound checkpoint is step {last_saved}" if last_saved is not None
                  else "there is no sound checkpoint, a rerun starts afresh")
        return NonFiniteLossError(
            f"{name}: {what}; nothing was saved after it: {resume}. Lower the learning rate "
            "(--config.training.lr) or check the data, then rerun to resume.")

    def settle(first: int, stacked: dict) -> None:
        """Read the scalars of the call whose first step is `first`; stop on a non-finite
        loss."""
        nonlocal tick
        stacked = {k: np.asarray(v) for k, v in jax.device_get(stacked).items()}
        for i in range(len(stacked["loss"])):
            step = first + i
            m = {k: float(v[i]) for k, v in stacked.items()}
            if not m["finite"]:
                raise diverged(f"the loss became non-finite at step {step + 1} (loss="
                               f"{m['loss']}, grad_norm={m['grad_norm']}); that update was not "
                               "applied")
            window.append(m)
            bar.update(1)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                now = time.perf_counter()
                record = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                record.update(step=step + 1, steps_per_sec=len(window) / (now - tick), phase=name)
                record.pop("finite")
                bar.set_postfix(loss=f"{record['loss']:.4g}",
                                sps=f"{record['steps_per_sec']:.2f}")
                if metrics and lead:
                    metrics.write(record)
                window.clear()
                tick = now

    def call_end(step: int) -> int:
        """Where the call starting at `step` stops at the latest: steps_per_call on, and never
        past a checkpoint or a hook."""
        end = min(steps, step + steps_per_call)
        for every_n in (checkpoint_every if checkpoints else 0,
                        interval_every if on_interval else 0):
            if every_n:
                end = min(end, (step // every_n + 1) * every_n)
        return end

    def next_call(step: int) -> tuple[tuple, list[dict]]:
        """(slots, rows) of the call starting at `step`: steps_per_call steps when they reach
        no checkpoint or hook before their end and share one slot layout, else one step. So
        calls come in two lengths, and compile to at most two programs per slot layout."""
        whole = call_end(step) - step == steps_per_call
        while len(ahead) < (steps_per_call if whole else 1):
            ahead.append(batches.get(step + len(ahead)))
        slots = ahead[0][0]
        if whole and all(s == slots for s, _ in itertools.islice(ahead, steps_per_call)):
            return slots, [ahead.popleft()[1] for _ in range(steps_per_call)]
        return slots, [ahead.popleft()[1]]

    # The host builds the next batches while the device runs this call (data/batches.py).
    batches = Prefetcher(batcher, range(start, steps), shards, depth=prefetch)
    ahead: collections.deque[tuple[tuple, dict]] = collections.deque()  # fetched, not yet run
    step, calls = start, start
    try:
        while step < steps:
            slots, rows = next_call(step)
            done = step + len(rows)
            state, m = update(state, put_batches(rows, mesh), slots)
            if pending:
                settle(*pending)
            pending, step = (step, m), done
            calls += 1  # the preemption sync point counts calls, the same on every process
            preempted = watch.reached(calls)
            save = checkpoints and (done == steps or preempted or (
                checkpoint_every and done % checkpoint_every == 0))
            if save or (on_interval and interval_every and done % interval_every == 0):
                settle(*pending)  # never save or show a state without checking its loss
                pending = None
            if save:
                why, norm = unsound(state.trainable, reference, max_param_growth)
                if why is not None:
                    raise diverged(f"the weights after step {done} are not sound ({why})")
                checkpoints.save(done, state, {**(meta or {}), "step": done})
                last_saved, reference = done, norm
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

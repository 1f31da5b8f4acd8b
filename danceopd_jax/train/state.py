"""The train state (everything a checkpoint must hold) and the optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from danceopd_jax.train.mesh import StepShardings, put


class TrainState(struct.PyTreeNode):
    """step, trainable params, optimizer state and the run's base PRNG key (as raw key data).

    Every random draw of step s comes from fold_in(key, s), so (key, step) is the whole RNG
    state and a restored run continues the same random stream.
    """

    step: jax.Array
    trainable: Any
    opt_state: Any
    key: jax.Array

    @classmethod
    def create(cls, trainable: Any, optimizer: optax.GradientTransformation,
               seed: int) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), trainable=trainable,
                   opt_state=optimizer.init(trainable),
                   key=jax.random.key_data(jax.random.key(seed)))

    def step_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(self.key), self.step)

    def eval_trainable(self) -> Any:
        """The trainable params that sample, score and export the model: their moving
        average when the optimizer keeps one (training.ema_decay > 0), else the params."""
        ema = params_ema(self.opt_state)
        return self.trainable if ema is None else ema


class EmaState(NamedTuple):
    count: jax.Array  # updates averaged so far
    ema: Any  # the params' exponential moving average


def ema_decay_at(decay: float, count: jax.Array) -> jax.Array:
    """The decay of update number count + 1: min(decay, (1 + count) / (10 + count)), the
    warm-up of diffusers' EMAModel, so that early averages follow the params instead of
    staying at the init (with a plain 0.999, the init would still weigh 17% after 1,800
    updates)."""
    return jnp.minimum(decay, (1.0 + count) / (10.0 + count))


def track_ema(decay: float) -> optax.GradientTransformation:
    """Keeps an exponential moving average of the params in the optimizer state, so it is
    updated inside the jitted step, checkpointed and restored with the rest of the state. The
    chain's last transformation: it sees the final updates and passes them on unchanged."""
    def init(params: Any) -> EmaState:
        return EmaState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params))

    def update(updates: Any, state: EmaState, params: Any = None) -> tuple[Any, EmaState]:
        if params is None:
            raise ValueError("track_ema needs the params: call optimizer.update(grads, state, "
                             "params).")
        d = ema_decay_at(decay, state.count)
        new = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: e + (1.0 - d) * (p - e), state.ema, new)
        return updates, EmaState(state.count + 1, ema)

    return optax.GradientTransformation(init, update)


def params_ema(opt_state: Any) -> Any | None:
    """The moving average of the params that track_ema keeps in opt_state (None if none)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
             if isinstance(s, EmaState)]
    return found[0].ema if found else None


def make_optimizer(lr: float, weight_decay: float, grad_clip: float, warmup_steps: int = 0,
                   decay_steps: int = 0, cooldown_steps: int = 0,
                   ema_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (METHOD.md 8), the rate warmed up linearly over
    warmup_steps.

    decay_steps > 0 brings the rate to zero at that step: by a cosine decay after the warm-up
    (the teachers) or, with cooldown_steps > 0, linearly over its last cooldown_steps
    (warm-up / stable / cool-down: the student). ema_decay > 0 also keeps a moving average of
    the params (track_ema)."""
    schedule = rate_schedule(lr, warmup_steps, decay_steps, cooldown_steps)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    ema = [track_ema(ema_decay)] if ema_decay > 0 else []
    return optax.chain(*parts, optax.adamw(schedule, weight_decay=weight_decay), *ema)


def rate_schedule(lr: float, warmup_steps: int = 0, decay_steps: int = 0,
                  cooldown_steps: int = 0) -> optax.Schedule | float:
    """make_optimizer's rate: update count -> rate (a constant when it never changes)."""
    if lr <= 0:
        raise ValueError(f"learning rate {lr} must be > 0.")
    if decay_steps and not cooldown_steps:
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, decay_steps)
    if not (warmup_steps or cooldown_steps):
        return lr

    def schedule(count: jax.Array) -> jax.Array:
        up = jnp.minimum(1.0, count / warmup_steps) if warmup_steps else 1.0
        down = (jnp.clip((decay_steps - count) / cooldown_steps, 0.0, 1.0)
                if cooldown_steps else 1.0)
        return lr * up * down
    return schedule


def _student_rate(training: Any) -> tuple[float, int, int, int]:
    """(lr, warm-up, decay, cool-down steps) of config.training (a workdir's config.json from
    before cooldown_fraction existed has none: no cool-down)."""
    cooldown = round(training.get("cooldown_fraction", 0.0) * training.steps)
    return training.lr, training.warmup_steps, training.steps if cooldown else 0, cooldown


def student_optimizer(training: Any) -> optax.GradientTransformation:
    """The student's optimizer from config.training (a workdir's config.json from before
    ema_decay existed has none: no EMA)."""
    lr, warmup, decay, cooldown = _student_rate(training)
    return make_optimizer(lr, training.weight_decay, training.grad_clip, warmup, decay, cooldown,
                          training.get("ema_decay", 0.0))


def student_rate(training: Any) -> Callable[[int], float]:
    """The student's rate at each update count, for the metrics."""
    schedule = rate_schedule(*_student_rate(training))
    return (lambda count: float(schedule(count))) if callable(schedule) else (
        lambda count: float(schedule))


def apply_if_finite(state: TrainState, grads: Any, loss: jax.Array,
                    optimizer: optax.GradientTransformation) -> tuple[TrainState, jax.Array]:
    """One optimizer update, skipped (state kept, step not advanced) if loss or grads are not
    finite, so the last good state survives for the host to checkpoint and report."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    new = state.replace(step=state.step + 1, opt_state=opt_state,
                        trainable=optax.apply_updates(state.trainable, updates))
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state), finite


def place_state(mesh: Mesh, trainable: Any, trainable_axes: Any, frozen: Any, frozen_axes: Any,
                optimizer: optax.GradientTransformation,
                seed: int) -> tuple[TrainState, Any, StepShardings]:
    """A fresh TrainState and the frozen params, laid out on the mesh by the sharding rules.

    The optimizer state is created directly in its shards (never whole on one device)."""
    def create(t: Any) -> TrainState:
        return TrainState.create(t, optimizer, seed)

    shardings = StepShardings.create(mesh, jax.eval_shape(create, trainable), trainable_axes,
                                     frozen, frozen_axes, optimizer)
    trainable = put(trainable, shardings.state.trainable)
    state = jax.jit(create, out_shardings=shardings.state)(trainable)
    return state, put(frozen, shardings.frozen), shardings

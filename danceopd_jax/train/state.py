"""The train state (everything a checkpoint must hold) and the optimizer."""

from __future__ import annotations

from typing import Any

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


def make_optimizer(lr: float, weight_decay: float, grad_clip: float, warmup_steps: int = 0,
                   decay_steps: int = 0, cooldown_steps: int = 0) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (METHOD.md 8), the rate warmed up linearly over
    warmup_steps.

    decay_steps > 0 brings the rate to zero at that step: by a cosine decay after the warm-up
    (the teachers) or, with cooldown_steps > 0, linearly over its last cooldown_steps
    (warm-up / stable / cool-down: the student)."""
    if lr <= 0:
        raise ValueError(f"learning rate {lr} must be > 0.")
    if decay_steps and not cooldown_steps:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, decay_steps)
    elif not (warmup_steps or cooldown_steps):
        schedule = lr
    else:
        def schedule(count: jax.Array) -> jax.Array:
            up = jnp.minimum(1.0, count / warmup_steps) if warmup_steps else 1.0
            down = (jnp.clip((decay_steps - count) / cooldown_steps, 0.0, 1.0)
                    if cooldown_steps else 1.0)
            return lr * up * down
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    return optax.chain(*parts, optax.adamw(schedule, weight_decay=weight_decay))


def student_optimizer(training: Any) -> optax.GradientTransformation:
    """The student's optimizer from config.training (a workdir's config.json from before
    cooldown_fraction existed has none: no cool-down)."""
    cooldown = round(training.get("cooldown_fraction", 0.0) * training.steps)
    return make_optimizer(training.lr, training.weight_decay, training.grad_clip,
                          training.warmup_steps, training.steps if cooldown else 0, cooldown)


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

"""The jitted update steps: distillation for the student (DanceOPD and the baselines of
METHOD.md 7), flow matching for the teachers and the data-mixing SFT baseline.

Each is one pure function (state, frozen, batch[, slots]) -> (state, metrics): randomness comes
from the state's key folded with its step, routing slots are static (one compiled program per
slot layout), and the state is donated so parameters are updated in place. It is compiled as
`consecutive` steps: one call runs as many steps as its batches stack (a `lax.scan`), so the
fixed costs of a call are paid once per call rather than once per step. Given StepShardings
(train/mesh.py) the steps are compiled with them as explicit in/out shardings; the math never
depends on the mesh. A distillation method is an Objective (built by its record in the method
registry, core/methods.py) plugged into the one make_distill_step, so every method shares the
optimizer, the routing and the random streams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from danceopd_jax.core.fields import Field
from danceopd_jax.core.methods import Batch, Keep, Objective, danceopd_objective, flow_matching_loss
from danceopd_jax.core.routing import Slot
from danceopd_jax.train.mesh import StepShardings
from danceopd_jax.train.state import TrainState, apply_if_finite

# (frozen params, batch, key) -> cond; the key drives optional prompt dropout.
Conditioner = Callable[[Any, Batch, jax.Array], dict]
# (trainable, frozen) -> the student's field params (identity, or a LoRA merge onto the base).
StudentParams = Callable[[Any, Any], Any]


def consecutive(step: Callable) -> Callable:
    """`step` (state, frozen, batch, *static) -> (state, metrics) as a call that runs one step
    per batch of `batches` (the steps' batches stacked on a leading axis), in order: (state,
    frozen, batches, *static) -> (state, metrics stacked the same way).

    A call of j steps is one program: on a CPU its temporaries (about 120 MB for the default's
    step, which the allocator maps fresh and the kernel zeroes on every call) are paid once per
    j steps (training.steps_per_call, docs/performance.md). Each step still derives its
    randomness from its own state.step, so the steps are those of j separate calls."""
    def steps(state: TrainState, frozen: Any, batches: Batch, *static: Any):
        return jax.lax.scan(lambda s, batch: step(s, frozen, batch, *static), state, batches)

    return steps


def make_distill_step(objective: Objective, student_params: StudentParams,
                      route_teachers: Sequence[str], conditioner: Conditioner,
                      optimizer: optax.GradientTransformation,
                      shardings: StepShardings | None = None) -> Callable:
    """frozen = {"teachers": {name: params}, ...}; route m uses teachers[route_teachers[m]].

    Each step's batch is `shards` blocks, each tiled by the slots (train/mesh.py); the call
    takes the batches of its steps stacked (`consecutive`)."""
    def step(state: TrainState, frozen: Any, batch: Batch, slots: tuple[Slot, ...]):
        k_noise, k_query, k_cond = jax.random.split(state.step_key(), 3)
        cond = conditioner(frozen, batch, k_cond)
        route_params = [frozen["teachers"][name] for name in route_teachers]

        def loss_fn(trainable):
            return objective(student_params(trainable, frozen), route_params, slots, batch, cond,
                             k_noise, k_query)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        state, finite = apply_if_finite(state, grads, loss, optimizer)
        return state, {"loss": loss, "finite": finite, "grad_norm": optax.tree.norm(grads), **aux}

    return jax.jit(consecutive(step), static_argnums=(3,), donate_argnums=(0,),
                   **(shardings.jit_kwargs() if shardings else {}))


def make_danceopd_step(student: Field, student_params: StudentParams,
                       route_fields: Sequence[Field], route_teachers: Sequence[str],
                       conditioner: Conditioner, optimizer: optax.GradientTransformation,
                       sigmas: jax.Array, query_k: int, query_bias: str, shards: int = 1,
                       shardings: StepShardings | None = None,
                       rollout: str = "moving") -> Callable:
    """The DanceOPD step (make_distill_step with danceopd_objective)."""
    return make_distill_step(danceopd_objective(student, route_fields, sigmas, query_k,
                                                query_bias, shards, rollout),
                             student_params, route_teachers, conditioner, optimizer, shardings)


def make_flow_matching_step(field: Field, field_params: StudentParams, conditioner: Conditioner,
                            optimizer: optax.GradientTransformation,
                            shardings: StepShardings | None = None,
                            keep_routes: frozenset[int] = frozenset(), shards: int = 1
                            ) -> Callable:
    """Ground-truth flow matching (teacher / anchor training and the data-mixing baseline), at
    noise levels drawn uniformly: (state, frozen, batches, slots) -> (state, metrics).

    keep_routes: the rows of these routes (the step's slots, static; `shards` blocks) regress
    onto frozen["keep"]'s velocity instead of the data's (flow_matching_loss's Keep; a teacher
    recipe's keep_t2i). Only they read the slots, which are static: a caller without them whose
    layouts vary from step to step passes () (one compiled program)."""

    def step(state: TrainState, frozen: Any, batch: Batch, slots: tuple[Slot, ...]):
        k_noise, k_sigma, k_cond = jax.random.split(state.step_key(), 3)
        x0 = batch["target"]
        eps = jax.random.normal(k_noise, x0.shape, jnp.float32)
        sigma = jax.random.uniform(k_sigma, (x0.shape[0],))
        keep = Keep(frozen["keep"], slots, keep_routes, shards) if keep_routes else None

        def loss_fn(trainable):
            # The text encoder may be trainable (anchor), so condition inside the loss.
            params = {**frozen, **trainable}
            return flow_matching_loss(field, field_params(trainable, frozen), x0,
                                      conditioner(params, batch, k_cond), eps, sigma, keep)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        state, finite = apply_if_finite(state, grads, loss, optimizer)
        return state, {"loss": loss, "finite": finite, "grad_norm": optax.tree.norm(grads), **aux}

    return jax.jit(consecutive(step), static_argnums=(3,), donate_argnums=(0,),
                   **(shardings.jit_kwargs() if shardings else {}))

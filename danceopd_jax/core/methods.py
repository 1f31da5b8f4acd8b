"""The training methods (METHOD.md 2 and 7). Each loss is a pure function of a field, its
parameters and one batch; weight merging is a pure function of parameter trees.

danceopd_loss is METHOD.md 2 line by line: roll out the current student (stop-gradient) to the
sampled query states, ask the sample's routed teacher for its velocity there (no gradient),
and regress the student's velocity at the same state onto it. The baselines of METHOD.md 7
change one thing each: which states are queried (DiffusionOPD: all N, weighted; off-policy:
forward-noised endpoints), the target (soft mixing: every teacher at once), the objective
(Flow-OPD: an SDE policy gradient), or drop distillation altogether (data-mixing SFT, weight
merging).

Batches are `shards` blocks, each tiled by the routing slots (routed_velocity); every loss
keeps that layout when it repeats rows (K queries, G rollouts, N dense states), so the same
code is exact on any mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from danceopd_jax.core.fields import Cond, Field, Params, affine, map_per_sample
from danceopd_jax.core.query import sample_query
from danceopd_jax.core.rollout import rollout_to, sample, sde_rollout
from danceopd_jax.core.routing import Route, Slot
from danceopd_jax.core.schedule import (
    add_noise,
    gaussian_log_prob,
    sde_transition,
    velocity_target,
)

DSIGMA_MODES = ("true", "uniform")
FLOW_ADVANTAGES = ("kl", "log_ratio")
MERGE_MODES = ("average", "task_arithmetic")


def velocity_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


# --- routing a batch ------------------------------------------------------------------------

def by_route(fn: Callable[[Slot, Callable[[jax.Array], jax.Array]], jax.Array],
             slots: Sequence[Slot], batch: int, shards: int = 1) -> jax.Array:
    """fn(slot, take) for every slot, reassembled in the batch's row order.

    `take` cuts a [batch, ...] array down to the slot's rows. The batch is `shards` blocks of
    equal size (one per data-parallel shard, see train/mesh.py); the slots tile each block in
    order, so route m's rows are rows [start, stop) of every block, and taking them never
    moves data between shards."""
    if batch % shards or batch // shards != slots[-1].stop:
        raise ValueError(f"slots {[(s.start, s.stop) for s in slots]} tile {slots[-1].stop} rows "
                         f"per shard, but the batch of {batch} is {shards} shard(s); build the "
                         "batch and the step with the same number of shards.")

    def taker(s: Slot) -> Callable[[jax.Array], jax.Array]:
        def take(x: jax.Array) -> jax.Array:
            x = x.reshape((shards, batch // shards) + x.shape[1:])[:, s.start:s.stop]
            return x.reshape((-1,) + x.shape[2:])
        return take

    parts = []
    for s in slots:
        out = fn(s, taker(s))
        parts.append(out.reshape((shards, s.stop - s.start) + out.shape[1:]))
    out = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return out.reshape((batch,) + out.shape[2:])


def routed_velocity(route_fields: Sequence[Field], route_params: Sequence[Params],
                    slots: Sequence[Slot], z: jax.Array, sigma: jax.Array, cond: Cond,
                    shards: int = 1) -> jax.Array:
    """Each route's field evaluated on its own slot only (by_route)."""
    def velocity(s: Slot, take: Callable[[jax.Array], jax.Array]) -> jax.Array:
        return route_fields[s.route](route_params[s.route], take(z), take(sigma),
                                     map_per_sample(take, cond))
    return by_route(velocity, slots, z.shape[0], shards)


def repeat_slots(slots: Sequence[Slot], k: int) -> tuple[Slot, ...]:
    """The slots after every row is repeated k times (repeat_cond)."""
    return tuple(Slot(s.route, s.start * k, s.stop * k) for s in slots)


def repeat_cond(cond: Cond, k: int) -> Cond:
    """Repeat every per-sample condition K times (row b -> rows b*K .. b*K+K-1)."""
    return cond if k == 1 else map_per_sample(lambda x: jnp.repeat(x, k, axis=0), cond)


# --- on-policy ODE distillation -------------------------------------------------------------

def query_student_and_teacher(student: Field, params: Params, route_fields: Sequence[Field],
                              route_params: Sequence[Params], slots: Sequence[Slot],
                              z0: jax.Array, cond: Cond, sigmas: jax.Array,
                              query_idx: jax.Array, shards: int = 1,
                              rollout: str = "moving") -> tuple[jax.Array, jax.Array, dict]:
    """The student's prediction (with gradient) and its routed teacher's target (without) at
    the query states of the student's own stop-gradient ODE rollout, both [B*K, ...].

    z0: [B, ...] rollout noise; query_idx: [B, K] indices into the N-step schedule `sigmas`.
    The K queries of sample b sit at rows b*K .. b*K+K-1, so each shard block stays contiguous.
    """
    batch, k = query_idx.shape
    z_query, steps, forwards = rollout_to(student, params, z0, sigmas, cond, query_idx,
                                          rollout, shards)
    z_query = z_query.reshape((batch * k,) + z0.shape[1:])
    sigma_query = sigmas[query_idx.reshape(-1)]
    cond_query = repeat_cond(cond, k)
    target = jax.lax.stop_gradient(
        routed_velocity(route_fields, route_params, repeat_slots(slots, k), z_query, sigma_query,
                        cond_query, shards))
    pred = student(params, z_query, sigma_query, cond_query)
    return pred, target, {"rollout_steps": steps, "rollout_forwards": forwards,
                          "query_sigma": jnp.mean(sigma_query)}


def danceopd_loss(student: Field, params: Params, route_fields: Sequence[Field],
                  route_params: Sequence[Params], slots: Sequence[Slot], z0: jax.Array,
                  cond: Cond, sigmas: jax.Array, query_idx: jax.Array,
                  shards: int = 1, rollout: str = "moving") -> tuple[jax.Array, dict]:
    """On-policy distillation loss for one batch: the velocity MSE at the query states,
    averaged over the K queries (query_student_and_teacher)."""
    pred, target, aux = query_student_and_teacher(student, params, route_fields, route_params,
                                                  slots, z0, cond, sigmas, query_idx, shards,
                                                  rollout)
    return velocity_mse(pred, target), aux


def dsigma_weights(sigmas: jax.Array, dsigma: str) -> jax.Array:
    """[N] DiffusionOPD weights dsigma_k^2 / 2 of the N states: "true" takes
    dsigma_k = sigma_k - sigma_{k+1} of the schedule; "uniform" takes 1/N (the reference's
    parity setting), whatever the schedule."""
    n = sigmas.shape[0] - 1
    if dsigma == "true":
        return jnp.square(sigmas[:-1] - sigmas[1:]) / 2.0
    if dsigma == "uniform":
        return jnp.full((n,), 0.5 / n ** 2, jnp.float32)
    raise ValueError(f"dsigma {dsigma!r} is unknown; use one of {DSIGMA_MODES}.")


def diffusion_opd_loss(student: Field, params: Params, route_fields: Sequence[Field],
                       route_params: Sequence[Params], slots: Sequence[Slot], z0: jax.Array,
                       cond: Cond, sigmas: jax.Array, dsigma: str = "true",
                       shards: int = 1) -> tuple[jax.Array, dict]:
    """DiffusionOPD's dense ODE-KL (METHOD.md 7): every state z_0 .. z_{N-1} of the student's
    ODE rollout is queried, and the loss is sum_k (dsigma_k^2 / 2) * mse_k, mse_k the
    velocity MSE at state k over the batch (dsigma_weights)."""
    batch, n = z0.shape[0], sigmas.shape[0] - 1
    query_idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    # Every row runs to the same last state, so there are no rows to leave behind.
    pred, target, aux = query_student_and_teacher(student, params, route_fields, route_params,
                                                  slots, z0, cond, sigmas, query_idx, shards,
                                                  "batch")
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    mse_k = jnp.mean(err.reshape(batch, n, -1), axis=(0, 2))
    return jnp.sum(dsigma_weights(sigmas, dsigma) * mse_k), aux


def soft_mix_loss(student: Field, params: Params, route_fields: Sequence[Field],
                  route_params: Sequence[Params], weights: Sequence[float], z0: jax.Array,
                  cond: Cond, sigmas: jax.Array, query_idx: jax.Array, shards: int = 1,
                  rollout: str = "moving") -> tuple[jax.Array, dict]:
    """Soft teacher mixing (METHOD.md 7, the "target-field ambiguity" baseline): DanceOPD whose
    target for EVERY sample is the route-weighted average of all routes' fields (each with its
    own CFG), sum_m w_m v_m / sum_m w_m, instead of the sample's own route's field."""
    total = sum(weights)
    active = [m for m, w in enumerate(weights) if w > 0]
    mixed = affine([(weights[m] / total, route_fields[m]) for m in active])
    rows = z0.shape[0] // shards  # one slot: every row of each shard block gets the mixture
    pred, target, aux = query_student_and_teacher(
        student, params, [mixed], [tuple(route_params[m] for m in active)], (Slot(0, 0, rows),),
        z0, cond, sigmas, query_idx, shards, rollout)
    return velocity_mse(pred, target), {**aux, "teachers_per_query": jnp.asarray(len(active))}


# --- off-policy distillation ----------------------------------------------------------------

def off_policy_loss(student: Field, params: Params, route_fields: Sequence[Field],
                    route_params: Sequence[Params], slots: Sequence[Slot], x0: jax.Array,
                    teacher_endpoint: Sequence[bool], z_end: jax.Array, eps: jax.Array,
                    cond: Cond, sigmas: jax.Array, query_idx: jax.Array,
                    shards: int = 1) -> tuple[jax.Array, dict]:
    """Off-policy distillation (METHOD.md 7): the same velocity MSE against the routed teacher,
    but at forward-noised endpoints instead of the student's own states.

    The endpoint of a sample is its ground-truth target x0 [B, ...] on routes whose
    teacher_endpoint[m] is False (edits), and on the others (T2I) the routed teacher's own
    N-step ODE sample from the noise z_end [B, ...] (no gradient; the reference's Gaussian
    endpoint would leave the data manifold). Each endpoint is noised at the K query levels
    sigma = sigmas[query_idx] [B, K] with the noise eps [B, K, ...].
    """
    batch, k = query_idx.shape

    def endpoint(s: Slot, take: Callable[[jax.Array], jax.Array]) -> jax.Array:
        if not teacher_endpoint[s.route]:
            return take(x0)
        return sample(route_fields[s.route], route_params[s.route], take(z_end), sigmas,
                      map_per_sample(take, cond))

    x0 = jax.lax.stop_gradient(by_route(endpoint, slots, batch, shards))
    sigma_query = sigmas[query_idx.reshape(-1)]
    z_query = add_noise(jnp.repeat(x0, k, axis=0), eps.reshape((batch * k,) + x0.shape[1:]),
                        sigma_query)
    cond_query = repeat_cond(cond, k)
    target = jax.lax.stop_gradient(
        routed_velocity(route_fields, route_params, repeat_slots(slots, k), z_query, sigma_query,
                        cond_query, shards))
    pred = student(params, z_query, sigma_query, cond_query)
    forwards = (sigmas.shape[0] - 1) * any(teacher_endpoint[s.route] for s in slots)
    return velocity_mse(pred, target), {"endpoint_forwards": jnp.asarray(forwards),
                                        "query_sigma": jnp.mean(sigma_query)}


# --- Flow-OPD -------------------------------------------------------------------------------

def flow_opd_loss(student: Field, params: Params, route_fields: Sequence[Field],
                  route_params: Sequence[Params], slots: Sequence[Slot], z0: jax.Array,
                  cond: Cond, sigmas: jax.Array, noise: jax.Array, *, eta: float = 0.7,
                  ppo_clip: float = 1e-4, adv_clip: float = 5.0, advantage: str = "kl",
                  shards: int = 1) -> tuple[jax.Array, dict]:
    """Flow-OPD (METHOD.md 7): an SDE policy gradient with the teacher's transition as reward.

    z0: [B, G, ...] starting noise of G rollouts per prompt (rollout g of prompt b is row
    b*G + g); noise: [B, G, N, ...] the SDE's draws, step i's in noise[:, :, i].
    1. Roll out the student with the SDE of schedule.sde_transition (noise level eta), all N
       steps, under stop-gradient, recording each transition's log-probability log p_old
       (rollout.sde_rollout).
    2. At every visited state z_i (dense, B*G*N transitions) the student (with gradient) and
       the sample's routed teacher (without) give velocities, hence Gaussian transition means
       mu_s, mu_t with the same std s_i = g(sigma_i) * sqrt(sigma_i - sigma_{i+1}).
       log p = gaussian_log_prob(z_{i+1}; mu_s, s_i): float32, averaged over elements.
    3. Per-transition advantage A = clip(-KL, -adv_clip, adv_clip), held constant:
       "kl": the exact KL(N(mu_s, s^2) || N(mu_t, s^2)) per element, mean((mu_s - mu_t)^2) /
       (2 s^2). (The reference divides by g^2 instead of s^2 = g^2 |dsigma|, i.e. its KL is
       this one times |dsigma|; we keep the true KL.)
       "log_ratio": the one-sample estimate log p_s(z_{i+1}) - log p_t(z_{i+1}) at the
       sampled transition (the LLM on-policy-distillation reward; its mean is the KL).
       No group normalisation: G only multiplies the rollouts of a prompt, as in the reference.
    4. Clipped PPO (clipped_ppo): r = exp(log p - log p_old); loss = mean over transitions of
       max(-A r, -A clip(r, 1 - ppo_clip, 1 + ppo_clip)).
    There is one update per rollout, so r = 1 up to rounding and the clip never binds; the
    gradient is mean(-A * d log p). With the "kl" advantage A does not depend on the sampled
    z_{i+1}, so that gradient has zero mean (E[d log p] = 0): the METHOD/reference formulation
    learns only from noise. With "log_ratio" its mean is the pathwise gradient of the KL divided
    by the number of latent elements (log p is a per-element mean).
    """
    if advantage not in FLOW_ADVANTAGES:
        raise ValueError(f"Flow-OPD advantage {advantage!r} is unknown; use one of "
                         f"{FLOW_ADVANTAGES}.")
    batch, group = z0.shape[:2]
    n = sigmas.shape[0] - 1
    rollouts = batch * group
    cond_g = repeat_cond(cond, group)
    states, log_p_old = sde_rollout(student, params, z0.reshape((rollouts,) + z0.shape[2:]),
                                    sigmas, cond_g, noise.reshape((rollouts,) + noise.shape[2:]),
                                    eta)
    shape = (rollouts * n,) + states.shape[2:]
    z, z_next = states[:, :-1].reshape(shape), states[:, 1:].reshape(shape)
    sigma, sigma_next = jnp.tile(sigmas[:-1], rollouts), jnp.tile(sigmas[1:], rollouts)
    cond_q = repeat_cond(cond_g, n)
    v_teacher = jax.lax.stop_gradient(
        routed_velocity(route_fields, route_params, repeat_slots(slots, group * n), z, sigma,
                        cond_q, shards))
    mean_s, std = sde_transition(z, student(params, z, sigma, cond_q), sigma, sigma_next, eta)
    mean_t, _ = sde_transition(z, v_teacher, sigma, sigma_next, eta)
    log_p = gaussian_log_prob(z_next, mean_s, std)
    if advantage == "kl":
        diff = jnp.square(mean_s - mean_t).reshape(rollouts * n, -1)
        kl = jnp.mean(diff, axis=1) / (2.0 * jnp.square(std.reshape(-1)))
    else:
        kl = log_p - gaussian_log_prob(z_next, mean_t, std)
    kl = jax.lax.stop_gradient(kl)
    loss, clip_fraction = clipped_ppo(log_p, log_p_old.reshape(-1),
                                      jnp.clip(-kl, -adv_clip, adv_clip), ppo_clip)
    return loss, {"rollout_steps": jnp.asarray(n),
                  "rollout_forwards": jnp.asarray(n, jnp.float32), "teacher_kl": jnp.mean(kl),
                  "clip_fraction": clip_fraction}


def clipped_ppo(log_p: jax.Array, log_p_old: jax.Array, advantage: jax.Array,
                clip: float) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped surrogate, mean(max(-A r, -A clip(r, 1 - clip, 1 + clip))) with
    r = exp(log_p - log_p_old), and the fraction of ratios outside the clip range."""
    ratio = jnp.exp(log_p - jax.lax.stop_gradient(log_p_old))
    loss = jnp.mean(jnp.maximum(-advantage * ratio,
                                -advantage * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)))
    return loss, jnp.mean(jnp.abs(ratio - 1.0) > clip)


# --- objectives: a loss bound to its random inputs ------------------------------------------

Batch = dict[str, jax.Array]
# (student params, routed teachers' params, slots, batch, cond, noise key, query key)
#   -> (loss, metrics): one distillation method's loss on one batch, what the trainer's one
#   distillation step (train/step.make_distill_step) differentiates.
Objective = Callable[[Params, list, tuple[Slot, ...], Batch, Cond, jax.Array, jax.Array],
                     tuple[jax.Array, dict]]


def _noise_and_queries(batch: Batch, k_noise: jax.Array, k_query: jax.Array, num_steps: int,
                       query_k: int, query_bias: str,
                       shared_query: bool = False) -> tuple[jax.Array, jax.Array]:
    """Rollout noise shaped like the batch's images and [B, K] query indices."""
    z0 = jax.random.normal(k_noise, batch["target"].shape, jnp.float32)
    return z0, sample_query(k_query, z0.shape[0], num_steps, query_k, query_bias, shared_query)


def danceopd_objective(student: Field, route_fields: Sequence[Field], sigmas: jax.Array,
                       query_k: int, query_bias: str, shards: int = 1,
                       rollout: str = "moving", shared_query: bool = False) -> Objective:
    def objective(params, route_params, slots, batch, cond, k_noise, k_query):
        z0, query_idx = _noise_and_queries(batch, k_noise, k_query, sigmas.shape[0] - 1,
                                           query_k, query_bias, shared_query)
        return danceopd_loss(student, params, route_fields, route_params, slots, z0, cond,
                             sigmas, query_idx, shards, rollout)
    return objective


def soft_mix_objective(student: Field, route_fields: Sequence[Field],
                       route_weights: Sequence[float], sigmas: jax.Array, query_k: int,
                       query_bias: str, shards: int = 1,
                       rollout: str = "moving") -> Objective:
    def objective(params, route_params, slots, batch, cond, k_noise, k_query):
        del slots  # every sample gets the mixture of all routes
        z0, query_idx = _noise_and_queries(batch, k_noise, k_query, sigmas.shape[0] - 1,
                                           query_k, query_bias)
        return soft_mix_loss(student, params, route_fields, route_params, route_weights, z0,
                             cond, sigmas, query_idx, shards, rollout)
    return objective


def diffusion_opd_objective(student: Field, route_fields: Sequence[Field], sigmas: jax.Array,
                            dsigma: str, shards: int = 1) -> Objective:
    def objective(params, route_params, slots, batch, cond, k_noise, k_query):
        del k_query  # dense: every state is queried
        z0 = jax.random.normal(k_noise, batch["target"].shape, jnp.float32)
        return diffusion_opd_loss(student, params, route_fields, route_params, slots, z0, cond,
                                  sigmas, dsigma, shards)
    return objective


def flow_opd_objective(student: Field, route_fields: Sequence[Field], sigmas: jax.Array,
                       group: int, eta: float, ppo_clip: float, adv_clip: float,
                       advantage: str = "kl", shards: int = 1) -> Objective:
    """Each prompt of the batch is rolled out `group` times (G rollouts per prompt)."""
    def objective(params, route_params, slots, batch, cond, k_noise, k_query):
        del k_query  # dense: every transition is used
        k_z0, k_sde = jax.random.split(k_noise)
        b, *image = batch["target"].shape
        z0 = jax.random.normal(k_z0, (b, group, *image), jnp.float32)
        noise = jax.random.normal(k_sde, (b, group, sigmas.shape[0] - 1, *image), jnp.float32)
        return flow_opd_loss(student, params, route_fields, route_params, slots, z0, cond,
                             sigmas, noise, eta=eta, ppo_clip=ppo_clip, adv_clip=adv_clip,
                             advantage=advantage, shards=shards)
    return objective


def off_policy_objective(student: Field, route_fields: Sequence[Field],
                         teacher_endpoint: Sequence[bool], sigmas: jax.Array, query_k: int,
                         query_bias: str, shards: int = 1) -> Objective:
    """teacher_endpoint[m]: route m's endpoints are its teacher's samples (T2I), not the
    batch's ground-truth targets (edits)."""
    def objective(params, route_params, slots, batch, cond, k_noise, k_query):
        k_end, k_eps = jax.random.split(k_noise)
        x0 = batch["target"]
        z_end, query_idx = _noise_and_queries(batch, k_end, k_query, sigmas.shape[0] - 1,
                                              query_k, query_bias)
        eps = jax.random.normal(k_eps, (x0.shape[0], query_k) + x0.shape[1:], jnp.float32)
        return off_policy_loss(student, params, route_fields, route_params, slots, x0,
                               teacher_endpoint, z_end, eps, cond, sigmas, query_idx, shards)
    return objective



# --- ground truth and weights only ----------------------------------------------------------

@dataclass(frozen=True)
class Keep:
    """What flow matching keeps (flow_matching_loss): the rows of `routes` (route indices into
    the batch's `slots`, which tile each of its `shards` blocks) regress onto the velocity of a
    frozen model of the same field, `params`."""
    params: Params
    slots: tuple[Slot, ...]
    routes: frozenset[int]
    shards: int = 1


def flow_matching_loss(field: Field, params: Params, x0: jax.Array, cond: Cond, eps: jax.Array,
                       sigma: jax.Array, keep: Keep | None = None) -> tuple[jax.Array, dict]:
    """Plain (off-trajectory) flow matching on ground truth: trains the teachers and the anchor,
    and is the data-mixing SFT baseline on the routed batch's targets (METHOD.md 7).

    With `keep`, its routes' rows regress onto the frozen model's velocity at the same noisy
    state instead of the data's, so what it does on them is kept (the omni base keeps its T2I
    anchor's T2I while it learns edits); the frozen model runs on those rows only (by_route)."""
    z = add_noise(x0, eps, sigma)
    target = velocity_target(x0, eps)
    if keep is not None:
        def slot_target(s: Slot, take: Callable[[jax.Array], jax.Array]) -> jax.Array:
            if s.route not in keep.routes:
                return take(target)
            return jax.lax.stop_gradient(field(keep.params, take(z), take(sigma),
                                               map_per_sample(take, cond)))
        target = by_route(slot_target, keep.slots, x0.shape[0], keep.shards)
    return velocity_mse(field(params, z, sigma, cond), target), {}


def merge_coefficients(routes: Sequence[Route], mode: str,
                       scale: float = 1.0) -> dict[str, float]:
    """lambda per routed teacher (routes with a positive weight): "average" = the teacher's
    share of the route weights; "task_arithmetic" = `scale` for each."""
    active = [r for r in routes if r.weight > 0]
    if mode == "average":
        total = sum(r.weight for r in active)
        coefficients: dict[str, float] = {}
        for r in active:
            coefficients[r.teacher] = coefficients.get(r.teacher, 0.0) + r.weight / total
        return coefficients
    if mode == "task_arithmetic":
        return {r.teacher: scale for r in active}
    raise ValueError(f"weight merge mode {mode!r} is unknown; use one of {MERGE_MODES}.")


def merge_weights(anchor: Params, teachers: Sequence[Params],
                  coefficients: Sequence[float]) -> Params:
    """Weight merging (METHOD.md 7): anchor + sum_m lambda_m (theta_m - anchor), in float32,
    returned in the anchor's dtypes. The anchor itself may be a term (its delta is zero)."""
    def merge(a: jax.Array, *thetas: jax.Array) -> jax.Array:
        a32 = a.astype(jnp.float32)
        delta = sum(c * (t.astype(jnp.float32) - a32)
                    for c, t in zip(coefficients, thetas, strict=True))
        return (a32 + delta).astype(a.dtype)
    return jax.tree.map(merge, anchor, *teachers)


# --- the registry: one record per method ----------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """What a method's objective is built from: the student's field, each route's teacher field
    (with its CFG), the routes and whether their buckets carry source images, the rollout's
    schedule, the batch's shard count, and the config's option groups `danceopd` and
    `baselines` (mappings; core never sees the config object itself)."""

    student: Field
    route_fields: Sequence[Field]
    routes: Sequence[Route]
    route_has_source: Sequence[bool]
    sigmas: jax.Array
    shards: int
    danceopd: Mapping[str, Any]
    baselines: Mapping[str, Any]


def _never(has_source: bool) -> bool:
    return False


def _no_check(config: Any) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """One training method (README "Methods").

    train: "distill" (objective(setting) is plugged into the one distillation step),
    "flow_matching" (plain flow matching on the routed batch's ground truth) or "merge" (no
    optimisation: the student is the teachers' weight merge).
    needs_targets(has_source): whether a routed bucket must carry ground-truth target images.
    check(config): the method's own validation, run by config.validate before anything loads.
    Adding a method is one loss (with its Objective builder) plus one register(Method(...))."""

    name: str
    train: str
    objective: Callable[[Setting], Objective] | None = None
    needs_targets: Callable[[bool], bool] = _never
    check: Callable[[Any], None] = _no_check
    # The comparison tables' rows (the reproduce command): (variant, config overrides), each
    # value a constant or a callable of the config; the label names the method.
    label: str = ""
    arms: tuple[tuple[str, Mapping[str, Any]], ...] = (("", {}),)


TRAINERS = ("distill", "flow_matching", "merge")
REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.train not in TRAINERS:
        raise ValueError(f"method {method.name!r} has train={method.train!r}; use one of "
                         f"{TRAINERS}.")
    if (method.objective is None) == (method.train == "distill"):
        raise ValueError(f"method {method.name!r}: a 'distill' method needs an objective, and "
                         "only a 'distill' method has one.")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"method={name!r} is unknown; use one of {tuple(REGISTRY)} "
                         "(--config.method=...).")
    return REGISTRY[name]


def _check_weight_merge(config: Any) -> None:
    if config.training.lora_rank > 0:
        raise ValueError(f"method='weight_merge' with training.lora_rank="
                         f"{config.training.lora_rank}: a merged student is a full set of "
                         "weights, not a LoRA; set training.lora_rank=0.")


def _danceopd(s: Setting) -> Objective:
    d = s.danceopd
    return danceopd_objective(s.student, s.route_fields, s.sigmas, d["query_k"],
                              d["query_bias"], s.shards, d["rollout"], d["shared_query"])


def _diffusion_opd(s: Setting) -> Objective:
    return diffusion_opd_objective(s.student, s.route_fields, s.sigmas, s.baselines["dsigma"],
                                   s.shards)


def _flow_opd(s: Setting) -> Objective:
    b = s.baselines
    return flow_opd_objective(s.student, s.route_fields, s.sigmas, b["group"], b["eta"],
                              b["ppo_clip"], b["adv_clip"], b["advantage"], s.shards)


def _off_policy(s: Setting) -> Objective:
    # T2I buckets have no source: their endpoints are the routed teacher's own samples.
    return off_policy_objective(s.student, s.route_fields,
                                [not has for has in s.route_has_source], s.sigmas,
                                s.danceopd["query_k"], s.danceopd["query_bias"], s.shards)


def _soft_mix(s: Setting) -> Objective:
    return soft_mix_objective(s.student, s.route_fields, [r.weight for r in s.routes], s.sigmas,
                              s.danceopd["query_k"], s.danceopd["query_bias"], s.shards,
                              s.danceopd["rollout"])


def _flow_prompts(config: Any) -> int:
    # batch_size counts prompts and each is rolled out G times: B / G prompts keep the rollouts
    # per step equal to the other methods' samples per step.
    return max(len(config.routes), config.training.batch_size // config.baselines.group)


register(Method("danceopd", "distill", _danceopd, label="DanceOPD"))
register(Method("diffusion_opd", "distill", _diffusion_opd, label="DiffusionOPD", arms=(
    ("uniform dsigma", {"baselines.dsigma": "uniform"}),
    ("true dsigma", {"baselines.dsigma": "true"}))))
# Flow-OPD starts from the teachers' weight merge, as the reference's paper baselines do.
register(Method("flow_opd", "distill", _flow_opd, label="Flow-OPD",
                arms=(("", {"training.batch_size": _flow_prompts, "training.init": "merge"}),)))
register(Method("off_policy", "distill", _off_policy, needs_targets=lambda has_source: has_source,
                label="Off-policy"))
register(Method("soft_mix", "distill", _soft_mix, label="Soft mixing"))
register(Method("sft_mix", "flow_matching", needs_targets=lambda has_source: True,
                label="Data-mixing SFT"))
register(Method("weight_merge", "merge", check=_check_weight_merge, label="Weight merging"))

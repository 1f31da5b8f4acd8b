"""The baselines of METHOD.md 7 on tiny analytic fields: each loss equals a value computed by
hand in numpy, gradients reach only the student's prediction, and bad method settings fail
before anything compiles."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from danceopd_jax import worlds
from danceopd_jax.config import validate
from danceopd_jax.core import methods, schedule
from danceopd_jax.core.rollout import rollout_to, sde_rollout
from danceopd_jax.core.routing import Route, Slot
from danceopd_jax.data.batches import RouteBatcher
from danceopd_jax.data.store import load_params
from danceopd_jax.jobs import distill
from danceopd_jax.jobs.workdir import load_student
from danceopd_jax.train.checkpoint import RunCheckpoints
from danceopd_jax.train.mesh import make_mesh, put
from danceopd_jax.train.state import make_optimizer, place_state
from danceopd_jax.train.student import initial_trainable, method_update, student_params_fn

SHAPE = (2, 2, 1)  # one tiny latent per sample
STUDENT = {"a": -0.3, "b": 0.2, "d": 0.0}
TEACHERS = [{"a": 0.1, "b": 0.0, "d": 0.5}, {"a": -0.5, "b": 1.0, "d": -3.0}]
SLOTS = (Slot(0, 0, 1), Slot(1, 1, 2))  # sample 0 -> teacher 0, sample 1 -> teacher 1
COND = np.array([0.1, -0.2])  # a per-sample offset every field adds: the "prompt"


def one_call(batch):
    """One step's batch as a call's stack of batches (train/step.consecutive)."""
    return jax.tree.map(lambda x: x[None], batch)


def field(params, z, sigma, cond):
    """v = a*z + b*sigma + d + c: linear in everything, so every expected value is plain numpy."""
    shape = (-1,) + (1,) * (z.ndim - 1)
    return (params["a"] * z + params["b"] * sigma.reshape(shape) + params["d"]
            + cond["c"].reshape(shape))


def np_field(params, z, sigma, c):
    shape = (-1,) + (1,) * (z.ndim - 1)
    sigma = np.broadcast_to(sigma, (z.shape[0],))
    return (params["a"] * z + (params["b"] * sigma + params["d"] + c).reshape(shape))


def jax_params(p):
    return {k: jnp.float32(v) for k, v in p.items()}


def np_routed(z, sigma, c, teacher_of_row):
    """Row r's velocity from teacher teacher_of_row[r]."""
    sigma = np.broadcast_to(sigma, (z.shape[0],))
    return np.concatenate([np_field(TEACHERS[t], z[r:r + 1], sigma[r:r + 1], c[r:r + 1])
                           for r, t in enumerate(teacher_of_row)])


def np_ode_states(z0, s, c, upto):
    """z_0 .. z_upto of the student's Euler rollout."""
    states = [z0]
    for i in range(upto):
        states.append(states[-1] + (s[i + 1] - s[i]) * np_field(STUDENT, states[-1], s[i], c))
    return states


def cond_of(c):
    return {"c": jnp.asarray(c, jnp.float32)}


def normal(seed, shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float64)


# --- DiffusionOPD ---------------------------------------------------------------------------

@pytest.mark.parametrize("dsigma", ["true", "uniform"])
def test_diffusion_opd_is_the_dsigma_weighted_sum_of_dense_mses(dsigma):
    n = 3
    sigmas = schedule.make_sigmas(n, shift=3.0)  # shifted: true and uniform dsigma differ
    s = np.asarray(sigmas, np.float64)
    z0 = normal(0, (2, *SHAPE))
    states = np_ode_states(z0, s, COND, n - 1)
    want = 0.0
    for k in range(n):
        err = np_field(STUDENT, states[k], s[k], COND) - np_routed(states[k], s[k], COND, [0, 1])
        weight = (s[k] - s[k + 1]) ** 2 / 2 if dsigma == "true" else 1 / (2 * n ** 2)
        want += weight * np.mean(err ** 2)
    loss, aux = methods.diffusion_opd_loss(field, jax_params(STUDENT), [field, field],
                                           [jax_params(t) for t in TEACHERS], SLOTS,
                                           jnp.asarray(z0, jnp.float32), cond_of(COND), sigmas,
                                           dsigma)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert int(aux["rollout_forwards"]) == n - 1  # z_{N-1} is the last state queried
    with pytest.raises(ValueError, match="dsigma 'dt'"):
        methods.dsigma_weights(sigmas, "dt")


# --- Flow-OPD -------------------------------------------------------------------------------

def np_sde_mean_std(z, v, sigma, sigma_next, eta):
    g2 = eta ** 2 * sigma / (1 - (sigma_next if sigma >= 1 else sigma))
    dsigma = sigma_next - sigma
    return z + dsigma * (v + g2 / (2 * sigma) * (z + (1 - sigma) * v)), np.sqrt(g2 * -dsigma)


def np_log_prob(x, mean, std):
    lp = -(x - mean) ** 2 / (2 * std ** 2) - np.log(std) - 0.5 * np.log(2 * np.pi)
    return lp.reshape(lp.shape[0], -1).mean(axis=1)


@pytest.mark.parametrize("advantage", ["kl", "log_ratio"])
def test_flow_opd_sde_rollout_kl_advantage_clip_and_ppo_value(advantage):
    """2 prompts x G=2 rollouts, N=3 SDE steps; the teacher of prompt 1 is far enough from the
    student that some advantages hit the clip at 5 and others do not."""
    n, group, eta = 3, 2, 0.7
    sigmas = schedule.make_sigmas(n)
    s = np.asarray(sigmas, np.float64)
    z0, noise = normal(1, (2, group, *SHAPE)), normal(7, (2, group, n, *SHAPE))
    c = np.repeat(COND, group)  # rollout g of prompt b is row b*G + g
    teacher_of_row = [0, 0, 1, 1]
    rows_noise = noise.reshape(4, n, *SHAPE)
    z, kls, log_ps = z0.reshape(4, *SHAPE), [], []
    for i in range(n):
        mean_s, std = np_sde_mean_std(z, np_field(STUDENT, z, s[i], c), s[i], s[i + 1], eta)
        mean_t, _ = np_sde_mean_std(z, np_routed(z, s[i], c, teacher_of_row), s[i], s[i + 1],
                                    eta)
        z_next = mean_s + std * rows_noise[:, i]
        if advantage == "kl":
            kls.append(np.mean((mean_s - mean_t).reshape(4, -1) ** 2, axis=1) / (2 * std ** 2))
        else:
            kls.append(np_log_prob(z_next, mean_s, std) - np_log_prob(z_next, mean_t, std))
        log_ps.append(np_log_prob(z_next, mean_s, std))
        z = z_next
    kl = np.stack(kls, axis=1).reshape(-1)  # row r*N + i: rollout r, transition i
    adv = np.clip(-kl, -5.0, 5.0)
    assert np.any(np.abs(kl) > 5) and np.any(np.abs(kl) < 5)  # the clip binds on some only
    want = np.mean(-adv)  # one update per rollout: ratio = 1, so the PPO clip is inactive

    states, log_p_old = sde_rollout(field, jax_params(STUDENT),
                                    jnp.asarray(z0.reshape(4, *SHAPE), jnp.float32), sigmas,
                                    cond_of(c), jnp.asarray(rows_noise, jnp.float32), eta)
    np.testing.assert_allclose(states[:, -1], z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_p_old, np.stack(log_ps, axis=1), rtol=1e-5)

    loss, aux = jax.jit(lambda p: methods.flow_opd_loss(
        field, p, [field, field], [jax_params(t) for t in TEACHERS], SLOTS,
        jnp.asarray(z0, jnp.float32), cond_of(COND), sigmas, jnp.asarray(noise, jnp.float32),
        eta=eta, ppo_clip=1e-4,
        adv_clip=5.0, advantage=advantage))(jax_params(STUDENT))
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    np.testing.assert_allclose(float(aux["teacher_kl"]), np.mean(kl), rtol=1e-4)
    assert float(aux["clip_fraction"]) == 0.0 and int(aux["rollout_forwards"]) == n


def test_clipped_ppo_by_hand():
    """Ratios e^0, e^0.1, e^-0.1, e^0.05 with clip 0.02: the second and third are clipped
    (no gradient), the last is not (gradient -A r), the first is at r = 1."""
    log_p = jnp.array([0.0, 0.1, -0.1, 0.05])
    adv = jnp.array([1.0, 1.0, -2.0, -1.0])
    r = np.exp(np.asarray(log_p, np.float64))
    want = np.mean([-1.0, -1.02, 2 * 0.98, r[3]])
    loss, clipped = methods.clipped_ppo(log_p, jnp.zeros(4), adv, 0.02)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert float(clipped) == 0.75
    grad = jax.grad(lambda lp: methods.clipped_ppo(lp, jnp.zeros(4), adv, 0.02)[0])(log_p)
    np.testing.assert_allclose(grad, np.array([-1.0, 0.0, 0.0, r[3]]) / 4, rtol=1e-6)


# --- off-policy, soft mixing, data-mixing SFT -----------------------------------------------

def test_off_policy_noises_teacher_samples_for_t2i_and_ground_truth_for_edits():
    n, k = 3, 2
    sigmas = schedule.make_sigmas(n, shift=2.0)
    s = np.asarray(sigmas, np.float64)
    x0, z_end, eps = normal(2, (2, *SHAPE)), normal(3, (2, *SHAPE)), normal(4, (2, k, *SHAPE))
    idx = np.array([[1, 2], [0, 2]])
    # route 0 (T2I): its teacher's own ODE sample from z_end; route 1 (edit): the ground truth
    z = z_end[:1]
    for i in range(n):
        z = z + (s[i + 1] - s[i]) * np_field(TEACHERS[0], z, s[i], COND[:1])
    endpoints = np.concatenate([z, x0[1:]])
    sig = s[idx.reshape(-1)]
    zq = ((1 - sig)[:, None, None, None] * np.repeat(endpoints, k, axis=0)
          + sig[:, None, None, None] * eps.reshape(4, *SHAPE))
    cq = np.repeat(COND, k)
    err = np_field(STUDENT, zq, sig, cq) - np_routed(zq, sig, cq, [0, 0, 1, 1])
    loss, aux = methods.off_policy_loss(
        field, jax_params(STUDENT), [field, field], [jax_params(t) for t in TEACHERS], SLOTS,
        jnp.asarray(x0, jnp.float32), [True, False], jnp.asarray(z_end, jnp.float32),
        jnp.asarray(eps, jnp.float32), cond_of(COND), sigmas, jnp.asarray(idx))
    np.testing.assert_allclose(float(loss), np.mean(err ** 2), rtol=1e-5)
    assert int(aux["endpoint_forwards"]) == n


def test_soft_mix_targets_the_weighted_average_of_every_teacher_for_every_sample():
    n = 4
    sigmas = schedule.make_sigmas(n)
    s = np.asarray(sigmas, np.float64)
    z0 = normal(5, (2, *SHAPE))
    idx = np.array([[3], [1]])
    states = np_ode_states(z0, s, COND, 3)
    zq = np.concatenate([states[3][:1], states[1][1:]])
    sig = s[idx[:, 0]]
    target = sum(w * np_field(t, zq, sig, COND) for w, t in zip((0.25, 0.75), TEACHERS,
                                                                 strict=True))
    err = np_field(STUDENT, zq, sig, COND) - target
    ghost = {"a": jnp.float32(jnp.nan), "b": jnp.float32(0), "d": jnp.float32(0)}
    loss, aux = methods.soft_mix_loss(
        field, jax_params(STUDENT), [field] * 3, [*(jax_params(t) for t in TEACHERS), ghost],
        [1.0, 3.0, 0.0], jnp.asarray(z0, jnp.float32), cond_of(COND), sigmas, jnp.asarray(idx))
    np.testing.assert_allclose(float(loss), np.mean(err ** 2), rtol=1e-5)  # ghost: weight 0
    assert int(aux["teachers_per_query"]) == 2


def test_sft_mix_is_flow_matching_on_the_ground_truth_targets():
    x0, eps = normal(6, (2, *SHAPE)), normal(7, (2, *SHAPE))
    sigma = np.array([0.3, 0.8])
    z = (1 - sigma)[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    want = np.mean((np_field(STUDENT, z, sigma, COND) - (eps - x0)) ** 2)
    loss, _ = methods.flow_matching_loss(field, jax_params(STUDENT), jnp.asarray(x0, jnp.float32),
                                         cond_of(COND), jnp.asarray(eps, jnp.float32),
                                         jnp.asarray(sigma, jnp.float32))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_flow_matching_keeps_the_frozen_fields_velocity_on_the_kept_rows():
    """Keep: the kept route's rows regress onto the frozen field's velocity at the same noisy
    state, the others onto the data's; a field equal to the frozen one has no loss on them."""
    x0, eps = normal(6, (2, *SHAPE)), normal(7, (2, *SHAPE))
    sigma = np.array([0.3, 0.8])
    z = (1 - sigma)[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    pred, kept = np_field(STUDENT, z, sigma, COND), np_field(TEACHERS[0], z, sigma, COND)
    args = (field, jax_params(STUDENT), jnp.asarray(x0, jnp.float32), cond_of(COND),
            jnp.asarray(eps, jnp.float32), jnp.asarray(sigma, jnp.float32))
    loss, _ = methods.flow_matching_loss(*args, keep=methods.Keep(jax_params(TEACHERS[0]), SLOTS,
                                                                  frozenset({0})))
    want = np.mean(np.concatenate([(pred[:1] - kept[:1]) ** 2, (pred[1:] - (eps - x0)[1:]) ** 2]))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    loss, _ = methods.flow_matching_loss(*args, keep=methods.Keep(jax_params(STUDENT), SLOTS,
                                                                  frozenset({0, 1})))
    assert float(loss) == 0.0


# --- weight merging -------------------------------------------------------------------------

def test_weight_merge_average_and_task_arithmetic():
    routes = [Route("t2i", "anchor", "t2i", 0.25), Route("local", "edit", "local_edit", 0.5),
              Route("global", "edit", "global_edit", 0.25), Route("off", "other", "t2i", 0.0)]
    assert methods.merge_coefficients(routes, "average") == {"anchor": 0.25, "edit": 0.75}
    assert methods.merge_coefficients(routes, "task_arithmetic", 0.5) == {"anchor": 0.5,
                                                                          "edit": 0.5}
    with pytest.raises(ValueError, match="merge mode 'sum'"):
        methods.merge_coefficients(routes, "sum")
    anchor = {"w": jnp.array([1.0, 2.0]), "n": {"b": jnp.array([4.0], jnp.bfloat16)}}
    t1 = {"w": jnp.array([3.0, 2.0]), "n": {"b": jnp.array([0.0], jnp.bfloat16)}}
    t2 = {"w": jnp.array([1.0, 6.0]), "n": {"b": jnp.array([8.0], jnp.bfloat16)}}
    merged = methods.merge_weights(anchor, [anchor, t1, t2], [0.7, 0.25, 0.5])
    np.testing.assert_allclose(merged["w"], [1 + 0.25 * 2, 2 + 0.5 * 4])
    assert merged["n"]["b"].dtype == jnp.bfloat16
    np.testing.assert_allclose(merged["n"]["b"].astype(jnp.float32), [4 - 1 + 2])
    summed = methods.merge_weights(anchor, [t1, t2], [1.0, 1.0])  # task arithmetic, scale 1
    np.testing.assert_allclose(summed["w"], [3.0, 6.0])


# --- where the gradient flows ---------------------------------------------------------------

def inputs(batch, n, seed=8):
    """Noise and query indices for a batch of `batch` samples and an n-step schedule."""
    return {"z0": normal(seed, (batch, *SHAPE)), "eps": normal(seed + 1, (batch, 2, *SHAPE)),
            "noise": normal(seed + 2, (batch, 1, n, *SHAPE)),
            "idx": np.array([[2, 3], [1, 3]] * (batch // 2))}


def losses_of(method, sigmas, x, slots=SLOTS, shards=1):
    """The method's loss as a function of (student params, teacher params); x from inputs()."""
    cond = cond_of(np.tile(COND, shards))
    z0, eps, noise = (jnp.asarray(x[k], jnp.float32) for k in ("z0", "eps", "noise"))
    idx = jnp.asarray(x["idx"])
    return {
        "diffusion_opd": lambda p, t: methods.diffusion_opd_loss(
            field, p, [field] * 2, t, slots, z0, cond, sigmas, "true", shards)[0],
        "soft_mix": lambda p, t: methods.soft_mix_loss(
            field, p, [field] * 2, t, [0.5, 0.5], z0, cond, sigmas, idx, shards)[0],
        "off_policy": lambda p, t: methods.off_policy_loss(
            field, p, [field] * 2, t, slots, z0, [True, False], 2 * z0, eps, cond, sigmas,
            idx, shards)[0],
        "flow_opd": lambda p, t: methods.flow_opd_loss(
            field, p, [field] * 2, t, slots, z0[:, None], cond, sigmas, noise,
            advantage="log_ratio", shards=shards)[0],
    }[method]


@pytest.mark.parametrize("method", ["diffusion_opd", "soft_mix", "off_policy", "flow_opd"])
def test_teachers_get_no_gradient(method):
    sigmas = schedule.make_sigmas(4)
    loss = losses_of(method, sigmas, inputs(2, 4))
    teachers = [jax_params(t) for t in TEACHERS]
    grad_student, grad_teachers = jax.grad(loss, argnums=(0, 1))(jax_params(STUDENT), teachers)
    assert all(float(g) == 0.0 for g in jax.tree.leaves(grad_teachers))
    assert any(float(g) != 0.0 for g in jax.tree.leaves(grad_student))


def test_diffusion_opd_gradient_is_that_of_the_predictions_at_fixed_states():
    sigmas = schedule.make_sigmas(4, shift=3.0)
    z0 = jnp.asarray(normal(8, (2, *SHAPE)), jnp.float32)
    teachers = [jax_params(t) for t in TEACHERS]
    loss = losses_of("diffusion_opd", sigmas, {**inputs(2, 4), "z0": z0})
    idx = jnp.broadcast_to(jnp.arange(4), (2, 4))
    zq, _, _ = rollout_to(field, jax_params(STUDENT), z0, sigmas, cond_of(COND), idx)
    zq = zq.reshape(8, *SHAPE)
    sq, cq = jnp.tile(sigmas[:-1], 2), methods.repeat_cond(cond_of(COND), 4)
    target = methods.routed_velocity([field] * 2, teachers, methods.repeat_slots(SLOTS, 4), zq,
                                     sq, cq)
    weights = methods.dsigma_weights(sigmas, "true")

    def fixed(p):
        err = jnp.square(field(p, zq, sq, cq) - target).reshape(2, 4, -1)
        return jnp.sum(weights * jnp.mean(err, axis=(0, 2)))
    want = jax.grad(fixed)(jax_params(STUDENT))
    got = jax.grad(loss)(jax_params(STUDENT), teachers)
    for k in STUDENT:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-8)


def test_flow_opd_gradient_is_the_policy_gradient_at_fixed_transitions():
    """d loss = mean(-A d log p(z_{i+1} | z_i)) with the rollout and A held fixed."""
    sigmas = schedule.make_sigmas(4)
    x = inputs(2, 4)
    teachers = [jax_params(t) for t in TEACHERS]
    got = jax.grad(losses_of("flow_opd", sigmas, x))(jax_params(STUDENT), teachers)
    states, _ = sde_rollout(field, jax_params(STUDENT), jnp.asarray(x["z0"], jnp.float32),
                            sigmas, cond_of(COND), jnp.asarray(x["noise"][:, 0], jnp.float32),
                            0.7)
    z, z_next = states[:, :-1].reshape(8, *SHAPE), states[:, 1:].reshape(8, *SHAPE)
    s, s1 = jnp.tile(sigmas[:-1], 2), jnp.tile(sigmas[1:], 2)
    cq = methods.repeat_cond(cond_of(COND), 4)
    v_t = methods.routed_velocity([field] * 2, teachers, methods.repeat_slots(SLOTS, 4), z, s, cq)
    mean_t, std = schedule.sde_transition(z, v_t, s, s1, 0.7)

    def log_p(p):
        mean_s, _ = schedule.sde_transition(z, field(p, z, s, cq), s, s1, 0.7)
        return schedule.gaussian_log_prob(z_next, mean_s, std)
    adv = -(log_p(jax_params(STUDENT)) - schedule.gaussian_log_prob(z_next, mean_t, std))
    want = jax.grad(lambda p: jnp.mean(-jnp.clip(adv, -5, 5) * log_p(p)))(jax_params(STUDENT))
    for k in STUDENT:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["diffusion_opd", "soft_mix", "off_policy", "flow_opd"])
def test_two_shard_blocks_route_like_one(method):
    """A batch of two identical shard blocks (slots tiling each) gives the one-block loss and
    gradient: every method keeps the slot layout through its repeats (train/mesh.py)."""
    sigmas = schedule.make_sigmas(4)
    one = inputs(2, 4)
    two = {k: np.concatenate([v, v]) for k, v in one.items()}
    teachers = [jax_params(t) for t in TEACHERS]
    want = jax.value_and_grad(losses_of(method, sigmas, one))(jax_params(STUDENT), teachers)
    got = jax.value_and_grad(losses_of(method, sigmas, two, shards=2))(jax_params(STUDENT),
                                                                       teachers)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-8)


# --- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    ({"method": "distill"}, r"method='distill' is unknown; use one of \('danceopd'"),
    ({"baselines.dsigma": "dt"}, "baselines.dsigma='dt'"),
    ({"baselines.merge": "sum"}, "baselines.merge='sum'"),
    ({"baselines.advantage": "reward"}, "baselines.advantage='reward'"),
    ({"baselines.group": 0}, "baselines.group=0"),
    ({"baselines.eta": 0.0}, "baselines.eta=0.0"),
    ({"danceopd.rollout": "early"}, r"danceopd.rollout='early'; use one of \('moving'"),
    ({"method": "weight_merge", "training.lora_rank": 4}, "set training.lora_rank=0"),
])
def test_bad_method_settings_fail_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(tiny_config(**overrides))


def test_every_registered_method_validates_and_is_exercised():
    """Each record validates on the tiny config, and each is covered by the step test below
    (METRICS) or trains nothing: a method added to the registry without a test fails here."""
    for name, method in methods.REGISTRY.items():
        validate(tiny_config(method=name))
        assert method.train in methods.TRAINERS
        assert name in METRICS or name == "danceopd" or method.train == "merge", name


def test_a_record_must_match_its_trainer():
    with pytest.raises(ValueError, match="needs an objective"):
        methods.register(methods.Method("no_objective", "distill"))
    with pytest.raises(ValueError, match="train='sgd'"):
        methods.register(methods.Method("odd", "sgd"))
    assert "no_objective" not in methods.REGISTRY and "odd" not in methods.REGISTRY


# --- the trainer runs every method ----------------------------------------------------------

ONE_LAYER = {"model.depth": 1}  # the wiring is under test, not the backbone: compile less


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny config's routes, world, models and frozen params (random weights; an edit
    teacher unlike the anchor, so the losses are not ~0)."""
    world = worlds.build(tiny_config(**ONE_LAYER), tmp_path_factory.mktemp("m"))
    backbone = world.init_backbone
    edit = jax.tree.map(lambda x: x * 1.5 + 0.01, backbone)
    return world.routes, world, world.models, {
        "teachers": {"anchor": backbone, "joint_edit": edit}, "text": world.init_text}


# DanceOPD's own step runs end to end in test_train.py.
METRICS = {"diffusion_opd": {"rollout_forwards"},
           "flow_opd": {"rollout_forwards", "teacher_kl", "clip_fraction"},
           "off_policy": {"endpoint_forwards"}, "soft_mix": {"teachers_per_query"},
           "sft_mix": set()}


@pytest.mark.parametrize("method", sorted(METRICS))
def test_every_training_method_takes_a_step(tiny_run, method):
    """method_update (what the main job runs) for each method: one step on the tiny
    MMDiT updates the student, with a finite loss and the method's forward counts."""
    routes, world, models, frozen = tiny_run
    config = tiny_config(method=method, **ONE_LAYER, **{"baselines.group": 2})
    frozen_axes = {"teachers": {n: models.backbone_axes for n in frozen["teachers"]},
                   "text": models.text_axes}
    optimizer = make_optimizer(1e-3, 0.0, 1.0)
    trainable = initial_trainable(config, frozen["teachers"]["anchor"])
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    state, frozen, shardings = place_state(mesh, trainable, models.trainable_axes(trainable),
                                           frozen, frozen_axes, optimizer, config.seed)
    update = method_update(config, routes, models, student_params_fn(0.0),
                                   optimizer, schedule.make_sigmas(4), 1, shardings, frozen,
                                   world.bucket_has_source)
    before = np.asarray(state.trainable["backbone"]["proj_out"]["kernel"])
    slots, batch = RouteBatcher({r.bucket: world.train(r.bucket) for r in routes}, routes,
                                "per_sample", 4, config.seed)(0)
    state, metrics = update(state, put(one_call(batch), shardings.batches), slots)
    assert metrics["loss"].shape == (1,)  # one step per call
    assert bool(metrics["finite"][0]) and float(metrics["loss"][0]) > 0
    assert METRICS[method] <= set(metrics)
    assert int(state.step) == 1
    assert not np.array_equal(state.trainable["backbone"]["proj_out"]["kernel"], before)


def _to_one(s: methods.Setting) -> methods.Objective:
    """A test-only method: regress the student's velocity at pure noise onto one."""
    def objective(params, route_params, slots, batch, cond, k_noise, k_query):
        z = jax.random.normal(k_noise, batch["target"].shape)
        v = s.student(params, z, jnp.ones((z.shape[0],)), cond)
        return methods.velocity_mse(v, jnp.ones_like(v)), {"one_queries": jnp.asarray(1)}
    return objective


def test_adding_a_method_is_one_record(tiny_run, monkeypatch):
    """README "How to extend": one objective builder plus one registry record, and config
    validation, the prepared-data check, the trainer and the reproduce arms all know it."""
    monkeypatch.setitem(methods.REGISTRY, "to_one", None)  # so that it is removed after
    methods.register(methods.Method("to_one", "distill", _to_one,
                                    needs_targets=lambda has_source: has_source,
                                    label="To one"))
    config = tiny_config(method="to_one", **ONE_LAYER)
    validate(config)
    assert methods.get_method("to_one").needs_targets(True)
    from danceopd_jax.jobs import reproduce as experiments
    assert ("To one", {"method": "to_one"}) in [(a.label, a.overrides)
                                                  for a in experiments.method_arms()]
    routes, world, models, frozen = tiny_run
    frozen_axes = {"teachers": {n: models.backbone_axes for n in frozen["teachers"]},
                   "text": models.text_axes}
    optimizer = make_optimizer(1e-3, 0.0, 1.0)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    trainable = initial_trainable(config, frozen["teachers"]["anchor"])
    state, placed, shardings = place_state(mesh, trainable, {"backbone": models.backbone_axes},
                                           frozen, frozen_axes, optimizer, config.seed)
    update = method_update(config, routes, models, student_params_fn(0.0),
                                   optimizer, schedule.make_sigmas(4), 1, shardings, placed,
                                   world.bucket_has_source)
    slots, batch = RouteBatcher({r.bucket: world.train(r.bucket) for r in routes}, routes,
                                "per_sample", 4, config.seed)(0)
    state, metrics = update(state, put(one_call(batch), shardings.batches), slots)
    assert int(metrics["one_queries"][0]) == 1 and float(metrics["loss"][0]) > 0
    assert int(state.step) == 1


@pytest.mark.slow
def test_weight_merge_skips_training_and_saves_the_merged_student(trained, tmp_path):
    """No optimisation: checkpoint step 0 holds anchor + 0.75 (joint_edit - anchor) for the
    0.25 / 0.75 routes (the route-weighted merge), load_student restores it, and the student
    is scored."""
    shutil.copytree(trained[0] / "teachers", tmp_path / "teachers")
    config = tiny_config(method="weight_merge",
                         **{"baselines.merge": "average", "routes.t2i.weight": 0.25,
                            "routes.edit.weight": 0.75})
    scores = distill.run(config, tmp_path)
    assert RunCheckpoints(tmp_path / "checkpoints").latest_step() == 0
    assert not (tmp_path / "metrics.jsonl").exists()
    student = load_student(tmp_path)
    like = {"backbone": student.params}
    anchor = load_params(tmp_path / "teachers" / "anchor", {**like, "text": student.text})[0]
    edit = load_params(tmp_path / "teachers" / "joint_edit", like)[0]
    want = methods.merge_weights(anchor["backbone"], [edit["backbone"]], [0.75])
    for got, w in zip(jax.tree.leaves(student.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-6)
    assert {"t2i", "edit"} <= set(scores["models"]["student"])
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "weight_merge"

"""The algorithm (danceopd_jax.core) on tiny analytic fields: conventions, query sampling,
the stopped rollout, routing, field algebra and where the gradient flows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from danceopd_jax.core import fields, methods, query, routing, schedule
from danceopd_jax.core.rollout import rollout_to, sample


def linear_field(params, z, sigma, cond):
    """v = a*z + b*sigma + text-dependent offset: cheap, nonlinear in nothing, differentiable."""
    s = sigma.reshape((-1,) + (1,) * (z.ndim - 1))
    return params["a"] * z + params["b"] * s + cond["text"].mean(axis=(1, 2)).reshape(s.shape)


def make_cond(batch, text_value=1.0):
    return {"text": jnp.full((batch, 2, 3), text_value), "text_mask": jnp.ones((batch, 2), bool),
            "pooled": jnp.zeros((batch, 3)), "source": jnp.zeros((batch, 4, 4, 3)),
            "has_source": jnp.zeros((batch,), bool),
            "null": {"text": jnp.zeros((1, 2, 3)), "text_mask": jnp.ones((1, 2), bool),
                     "pooled": jnp.zeros((1, 3))}}


# --- schedule -------------------------------------------------------------------------------

def test_sigmas_clean_and_shift():
    s = schedule.make_sigmas(4)
    np.testing.assert_allclose(s, [1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = schedule.make_sigmas(4, shift=3.0)
    np.testing.assert_allclose(shifted, 3 * s / (1 + 2 * s), rtol=1e-6)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert np.all(np.diff(shifted) < 0)


def test_sigmas_diffusers_variant_has_tiny_last_step():
    s = schedule.make_sigmas(8, shift=3.0, variant="diffusers")
    assert s.shape == (9,) and s[-1] == 0.0
    np.testing.assert_allclose(s[-2], 3e-3 / (1 + 2e-3), rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [({"num_steps": 0}, "at least 1"),
                                           ({"num_steps": 4, "shift": 0.0}, "shift"),
                                           ({"num_steps": 4, "variant": "karras"}, "variant")])
def test_sigmas_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedule.make_sigmas(**kwargs)


def test_noising_velocity_and_euler_are_consistent():
    """Euler with the true velocity of a straight path lands exactly on the data."""
    key = jax.random.key(0)
    x0 = jax.random.normal(key, (2, 3, 3, 3))
    eps = jax.random.normal(jax.random.key(1), (2, 3, 3, 3))
    sig = jnp.array([0.7, 0.2])
    z = schedule.add_noise(x0, eps, sig)
    np.testing.assert_allclose(z[0], 0.3 * x0[0] + 0.7 * eps[0], atol=1e-6)
    np.testing.assert_allclose(z[1], 0.8 * x0[1] + 0.2 * eps[1], atol=1e-6)
    v = schedule.velocity_target(x0, eps)
    landed = schedule.euler_step(z, v, sig, jnp.zeros(2))
    np.testing.assert_allclose(landed, x0, atol=1e-5)


# --- query sampling -------------------------------------------------------------------------

def test_low_noise_query_distribution():
    idx = np.asarray(query.sample_query(jax.random.key(0), 20000, 16, 1, "low"))
    assert idx.shape == (20000, 1) and idx.min() >= 0 and idx.max() <= 15
    # E[floor(16 u)], u ~ Beta(5, 2): mean of u is 5/7, so about 16*5/7 - 0.5 = 10.9
    assert abs(idx.mean() - 10.9) < 0.15
    high = np.asarray(query.sample_query(jax.random.key(0), 20000, 16, 1, "high"))
    assert high.mean() < 5.0


def test_shared_query_is_one_draw_per_step_with_the_same_distribution():
    draws = np.stack([np.asarray(query.sample_query(jax.random.key(s), 8, 16, 2, "low",
                                                    shared=True)) for s in range(4000)])
    assert (draws == draws[:, :1]).all()  # every sample of a step has the step's indices
    assert abs(draws[:, 0, 0].mean() - 10.9) < 0.2  # the Beta(5, 2) marginal is unchanged


def test_query_dense_stratified_and_errors():
    dense = query.sample_query(jax.random.key(0), 3, 8, 8, "dense")
    np.testing.assert_array_equal(dense, np.tile(np.arange(8), (3, 1)))
    strat = np.asarray(query.sample_query(jax.random.key(1), 500, 16, 4, "stratified"))
    for j in range(4):  # each query falls in its own quarter of the trajectory
        assert strat[:, j].min() >= 4 * j and strat[:, j].max() < 4 * (j + 1)
    with pytest.raises(ValueError, match="K=0"):
        query.sample_query(jax.random.key(0), 2, 16, 0)
    with pytest.raises(ValueError, match="dense"):
        query.validate_query(16, 1, "dense")
    with pytest.raises(ValueError, match="bias"):
        query.validate_query(16, 1, "lowest")


# --- rollout --------------------------------------------------------------------------------

PARAMS = {"a": jnp.float32(-0.3), "b": jnp.float32(0.2)}


def python_rollout(params, z0, sigmas, cond, upto):
    z = z0
    for i in range(upto):
        sig = jnp.full((z.shape[0],), sigmas[i])
        z = schedule.euler_step(z, linear_field(params, z, sig, cond), sigmas[i], sigmas[i + 1])
    return z


def test_rollout_stops_at_query_index_and_matches_python_loop():
    sigmas = schedule.make_sigmas(16, shift=3.0)
    z0 = jax.random.normal(jax.random.key(0), (3, 4, 4, 3))
    cond = make_cond(3)
    stop_at = jnp.array([[2, 9], [5, 5], [0, 7]])
    states, steps, forwards = jax.jit(rollout_to, static_argnums=0)(linear_field, PARAMS, z0,
                                                                     sigmas, cond, stop_at)
    assert int(steps) == 9  # the largest index queried, not N = 16
    # Rows 0, 2, 1 in order (last indices 9, 7, 5); widths of 3 rows: 1, 2, 3. Steps 0-4 move
    # all 3, steps 5-6 two, steps 7-8 one: 21 rows, 7 forwards of the whole batch.
    assert float(forwards) == pytest.approx(7.0)
    for k in range(2):
        for b in range(3):  # the batch rolls out together; compare each sample's own index
            want = python_rollout(PARAMS, z0, sigmas, cond, int(stop_at[b, k]))
            np.testing.assert_allclose(states[b, k], want[b], atol=1e-5)


def test_rollout_moves_only_the_rows_short_of_their_index_within_each_shard_block():
    """Each step evaluates the field on the leading rows of every shard block, as many as the
    most still moving, rounded up to a quarter of the block; the states equal the whole
    batch's rollout (full=True) row for row, and rows never leave their block."""
    widths = []

    def field(params, z, sigma, cond):
        jax.debug.callback(lambda n: widths.append(int(n)), z.shape[0])
        return linear_field(params, z, sigma, cond) + cond["pooled"][:, :1, None, None]

    sigmas = schedule.make_sigmas(8, shift=3.0)
    z0 = jax.random.normal(jax.random.key(1), (8, 4, 4, 3))
    cond = {**make_cond(8), "pooled": jnp.arange(8.0)[:, None] * jnp.ones((8, 4))}
    # Block 0 (rows 0-3) last indices 1, 6, 2, 3; block 1 (rows 4-7) 5, 0, 4, 2.
    stop_at = jnp.array([[1], [6], [2], [3], [5], [0], [4], [2]])
    states, steps, forwards = rollout_to(field, PARAMS, z0, sigmas, cond, stop_at, shards=2)
    jax.effects_barrier()
    # The most rows still moving in either block at steps 0..5: 4 3 2 2 1 1 (quarters of 4
    # rows are exact), so the field sees twice that many rows.
    assert int(steps) == 6 and widths == [8, 6, 4, 4, 2, 2]
    assert float(forwards) == pytest.approx(26 / 8)
    whole, _, _ = rollout_to(field, PARAMS, z0, sigmas, cond, stop_at, rollout="full", shards=2)
    np.testing.assert_array_equal(states, whole)
    for b in range(8):
        want, row = z0[b:b + 1], jax.tree.map(lambda x, b=b: x[b:b + 1], cond)
        for i in range(int(stop_at[b, 0])):
            v = field(PARAMS, want, jnp.full((1,), sigmas[i]), row)
            want = schedule.euler_step(want, v, sigmas[i], sigmas[i + 1])
        np.testing.assert_allclose(states[b, 0], want[0], atol=1e-5)


def test_rollout_counts_field_calls():
    calls = []

    def counting_field(params, z, sigma, cond):
        jax.debug.callback(lambda: calls.append(1))
        return linear_field(params, z, sigma, cond)

    sigmas = schedule.make_sigmas(16)
    rollout_to(counting_field, PARAMS, jnp.ones((2, 4, 4, 3)), sigmas, make_cond(2),
               jnp.array([[3], [6]]))
    jax.effects_barrier()
    assert len(calls) == 6


def test_full_sample_equals_python_loop():
    sigmas = schedule.make_sigmas(8)
    z0 = jax.random.normal(jax.random.key(2), (2, 4, 4, 3))
    cond = make_cond(2)
    np.testing.assert_allclose(sample(linear_field, PARAMS, z0, sigmas, cond),
                               python_rollout(PARAMS, z0, sigmas, cond, 8), atol=1e-5)


# --- fields ---------------------------------------------------------------------------------

def test_cfg_algebra_and_source_kept():
    seen = []

    def field(params, z, sigma, cond):
        seen.append(cond)
        return linear_field(params, z, sigma, cond) + cond["source"].mean() * 0
    z = jnp.ones((2, 4, 4, 3))
    sig = jnp.array([0.5, 0.5])
    cond = make_cond(2, text_value=2.0)
    guided = fields.cfg(field, 3.5)(PARAMS, z, sig, cond)
    v_c = linear_field(PARAMS, z, sig, cond)
    v_u = linear_field(PARAMS, z, sig, fields.drop_text(cond))
    np.testing.assert_allclose(guided, v_u + 3.5 * (v_c - v_u), atol=1e-5)
    assert fields.cfg(field, 1.0) is field
    # the unconditional branch replaces text only: the source image stays
    unc = fields.drop_text({**cond, "source": jnp.full((2, 4, 4, 3), 7.0)})
    assert float(unc["source"].mean()) == 7.0 and float(unc["text"].mean()) == 0.0


def test_affine_combination_and_errors():
    def const(c):
        return lambda p, z, s, cond: jnp.full_like(z, c * p)
    mix = fields.affine([(0.25, const(1.0)), (0.75, const(2.0))])
    z = jnp.zeros((1, 2, 2, 3))
    np.testing.assert_allclose(mix((1.0, 1.0), z, jnp.zeros(1), {}), 1.75)
    with pytest.raises(ValueError, match="sum to"):
        fields.affine([(0.5, const(1.0)), (0.7, const(2.0))])
    with pytest.raises(KeyError, match="null"):
        fields.drop_text({"text": jnp.zeros((1, 2, 3))})


# --- routing --------------------------------------------------------------------------------

def test_slot_sizes_static_and_proportional():
    assert routing.slot_sizes([0.5, 0.5], 8) == (4, 4)
    assert routing.slot_sizes([1.0, 3.0], 8) == (2, 6)
    assert routing.slot_sizes([0.01, 0.99], 8) == (1, 7)  # every active route gets a slot
    assert routing.slot_sizes([0.0, 1.0], 8) == (0, 8)
    slots = routing.per_sample_slots([0.25, 0.0, 0.75], 8)
    assert slots == (routing.Slot(0, 0, 2), routing.Slot(2, 2, 8))
    with pytest.raises(ValueError, match="batch size 1"):
        routing.slot_sizes([1, 1], 1)


def test_per_step_route_is_shared_and_weighted():
    draws = [routing.per_step_route(0, s, [0.2, 0.8]) for s in range(2000)]
    assert draws == [routing.per_step_route(0, s, [0.2, 0.8]) for s in range(2000)]
    assert abs(np.mean(draws) - 0.8) < 0.04
    assert routing.step_slots("per_step", 0, 3, [1, 0], 8) == (routing.Slot(0, 0, 8),)


@pytest.mark.parametrize("routes, match", [
    ([routing.Route("r", "ghost", "t2i", 1.0)], "teacher 'ghost'"),
    ([routing.Route("r", "anchor", "nowhere", 1.0)], "bucket 'nowhere'"),
    ([routing.Route("r", "anchor", "t2i", -1.0)], "weight -1"),
    ([routing.Route("r", "anchor", "t2i", 0.0)], "all route weights are zero"),
    ([routing.Route("r", "edit", "t2i", 1.0)], "no source images"),
    ([], "no routes"),
])
def test_validate_routes_errors(routes, match):
    with pytest.raises(ValueError, match=match):
        routing.validate_routes(routes, {"anchor": "t2i", "edit": "edit"},
                                {"t2i": False, "local_edit": True})


def test_routed_velocity_runs_each_teacher_on_its_own_slot_only():
    seen = {}

    def teacher(tag, value):
        def f(params, z, sigma, cond):
            seen[tag] = z.shape[0]
            return jnp.full_like(z, value * params)
        return f
    z = jnp.zeros((6, 2, 2, 3))
    slots = (routing.Slot(0, 0, 2), routing.Slot(1, 2, 6))
    v = methods.routed_velocity([teacher("t0", 1.0), teacher("t1", 1.0)], [3.0, 5.0], slots, z,
                                jnp.zeros(6), make_cond(6))
    assert seen == {"t0": 2, "t1": 4}
    np.testing.assert_allclose(v[:2], 3.0)
    np.testing.assert_allclose(v[2:], 5.0)


# --- the loss -------------------------------------------------------------------------------

def test_danceopd_gradient_flows_only_through_the_student_prediction():
    """d loss / d params equals the gradient of ||student(z_q) - t||^2 with z_q and t held
    fixed: the rollout and the teacher contribute nothing."""
    sigmas = schedule.make_sigmas(8)
    z0 = jax.random.normal(jax.random.key(3), (4, 4, 4, 3))
    cond = make_cond(4)
    idx = jnp.array([[5], [2], [7], [6]])
    slots = (routing.Slot(0, 0, 2), routing.Slot(1, 2, 4))
    teacher_params = [{"a": jnp.float32(0.1), "b": jnp.float32(0.0)},
                      {"a": jnp.float32(-0.5), "b": jnp.float32(1.0)}]

    def loss(p):
        return methods.danceopd_loss(linear_field, p, [linear_field, linear_field],
                                     teacher_params, slots, z0, cond, sigmas, idx)[0]
    grad = jax.grad(loss)(PARAMS)

    zq, _, _ = rollout_to(linear_field, PARAMS, z0, sigmas, cond, idx)
    zq = zq[:, 0]
    sq = sigmas[idx[:, 0]]
    target = methods.routed_velocity([linear_field] * 2, teacher_params, slots, zq, sq, cond)

    def manual(p):
        return methods.velocity_mse(linear_field(p, zq, sq, cond), target)
    want = jax.grad(manual)(PARAMS)
    for k in PARAMS:
        np.testing.assert_allclose(grad[k], want[k], rtol=1e-5, atol=1e-7)
    assert float(loss(PARAMS)) > 0


def test_danceopd_loss_with_k_queries_repeats_conditions():
    sigmas = schedule.make_sigmas(8)
    z0 = jax.random.normal(jax.random.key(4), (2, 4, 4, 3))
    cond = make_cond(2)
    idx = jnp.array([[1, 6], [3, 4]])
    loss, aux = methods.danceopd_loss(linear_field, PARAMS, [linear_field], [PARAMS],
                                      (routing.Slot(0, 0, 2),), z0, cond, sigmas, idx)
    assert float(loss) == pytest.approx(0.0, abs=1e-10)  # the teacher IS the student here
    assert int(aux["rollout_steps"]) == 6  # rows' last indices 6 and 4: widths 1 and 2
    assert float(aux["rollout_forwards"]) == pytest.approx((4 * 2 + 2 * 1) / 2)

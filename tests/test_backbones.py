"""The backbone contract (models/contract.py): every family in models/backbones.py builds from
its tiny config, runs as a velocity field on its example conditions with an edit source, has
logical axes on every parameter, counts its forward FLOPs as XLA does (the matrix products),
and unstacks scanned layers into the per-layer layout its converters read."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from danceopd_jax.core.rollout import rollout_to
from danceopd_jax.core.schedule import make_sigmas
from danceopd_jax.models.backbones import BACKBONES, backbone_of, reference
from danceopd_jax.train.flops import Shape, forward_flops

B, LATENT, TEXT = 2, 16, 32


def _inputs(backbone, config):
    k_z, k_s, k_c = jax.random.split(jax.random.key(0), 3)
    shape = (B, LATENT, LATENT, config.in_channels)
    z = jax.random.normal(k_z, shape)
    cond = {**backbone.example_cond(k_c, config, B, TEXT),
            "source": jax.random.normal(k_s, shape), "has_source": jnp.ones((B,), bool)}
    return z, cond


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_a_backbone_is_a_velocity_field_with_logical_axes(name):
    backbone = BACKBONES[name]
    config = backbone.tiny()
    assert backbone_of(config) is backbone
    module = backbone.module(config, rngs=nnx.Rngs(0))
    z, cond = _inputs(backbone, config)
    v = module(z, jnp.full((B,), 0.5), cond)
    assert v.shape == z.shape and bool(jnp.all(jnp.isfinite(v)))
    specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(module, nnx.Param)),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    params = jax.tree.leaves(nnx.state(module, nnx.Param))
    assert len(specs) == len(params)
    assert all(isinstance(s, jax.sharding.PartitionSpec) for s in specs)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_the_moving_rollout_reaches_the_whole_batch_states(name):
    """A sample's forward does not depend on the other rows, so the rollout that steps only the
    rows short of their query index (at quarter widths) reaches the whole batch's states. On
    XLA's CPU the MMDiT (the shapes world's model) gives them bit for bit, as the docs say;
    Z-Image's forward rounds differently at other batch widths (about 5e-7 here)."""
    backbone = BACKBONES[name]
    config = backbone.tiny()
    graph, params = nnx.split(backbone.module(config, rngs=nnx.Rngs(0)))
    k_z, k_s, k_c = jax.random.split(jax.random.key(1), 3)
    batch = 8
    shape = (batch, LATENT, LATENT, config.in_channels)
    cond = {**backbone.example_cond(k_c, config, batch, TEXT),
            "source": jax.random.normal(k_s, shape), "has_source": jnp.ones((batch,), bool)}
    stop_at = jnp.array([[5], [1], [7], [3], [6], [2], [7], [4]])

    @jax.jit
    def states(p, z, c):
        def field(q, x, sigma, cc):
            return nnx.merge(graph, q)(x, sigma, cc)
        moving, _, forwards = rollout_to(field, p, z, make_sigmas(8), c, stop_at)
        whole, _, _ = rollout_to(field, p, z, make_sigmas(8), c, stop_at, rollout="batch")
        return moving, whole, forwards

    moving, whole, forwards = states(params, jax.random.normal(k_z, shape), cond)
    assert float(forwards) < 7  # fewer rows than 7 steps of the whole batch
    np.testing.assert_allclose(moving, whole, rtol=0, atol=0 if name == "mmdit" else 1e-5)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_forward_flops_match_xla_cost_analysis(name):
    """The family's count is the matrix products; XLA also counts elementwise work, so ours is
    a little lower, never higher."""
    backbone = BACKBONES[name]
    config = backbone.tiny()
    graph, params = nnx.split(backbone.module(config, rngs=nnx.Rngs(0)))
    z, cond = _inputs(backbone, config)
    forward = jax.jit(lambda p, z, c: nnx.merge(graph, p)(z, jnp.full((B,), 0.5), c))
    cost = forward.lower(params, z, cond).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    tokens = (LATENT // config.patch_size) ** 2
    ours = forward_flops(config, Shape(B, tokens, TEXT + backbone.padding_tokens, True))
    assert 0.85 * xla < ours <= xla


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_unscanned_is_the_per_layer_layout(name):
    backbone = BACKBONES[name]
    plain = backbone.tiny()
    scanned = dataclasses.replace(plain, scan_layers=True)
    params = nnx.to_pure_dict(nnx.state(backbone.module(scanned, rngs=nnx.Rngs(0)), nnx.Param))
    like = nnx.to_pure_dict(nnx.state(backbone.module(plain, rngs=nnx.Rngs(0)), nnx.Param))
    config, unstacked = backbone.unscanned(scanned, params)
    assert not config.scan_layers
    assert jax.tree.structure(unstacked) == jax.tree.structure(like)
    assert [np.shape(x) for x in jax.tree.leaves(unstacked)] == [
        np.shape(x) for x in jax.tree.leaves(like)]


def test_reference_models_are_found_by_name():
    backbone, make, tokens = reference("SD3.5-Medium")
    assert backbone.name == "mmdit" and tokens == 333 and make().num_layers == 24
    with pytest.raises(KeyError, match="Z-Image-6B"):
        reference("SD4")

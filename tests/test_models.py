"""Tests for the MMDiT backbone, the CLIP text encoder and functional LoRA (tiny configs)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from danceopd_jax.models import lora
from danceopd_jax.models.lora import init_lora, merge
from danceopd_jax.models.mmdit import (
    MMDiT,
    MMDiTConfig,
    PatchEmbed,
    _sincos_2d,
    block_groups,
    param_count,
    stack_blocks,
    timestep_embedding,
    tiny_config,
    unstack_blocks,
)
from danceopd_jax.models.text import CLIPTextEncoder, tiny_text_config

B, LT, SIDE, CH, TEXT_DIM = 4, 8, 24, 3, 64
Forward = Callable[[nnx.State, jax.Array, jax.Array, dict], jax.Array]


@pytest.fixture(scope="module", autouse=True)
def _exact_matmuls() -> Iterator[None]:
    """Full float32 matmuls, so tolerances also hold on GPUs (TF32 by default there)."""
    with jax.default_matmul_precision("highest"):
        yield


def _randomize(model: nnx.Module, seed: int) -> None:
    """Perturb every parameter but ``source_embed``: adaLN-Zero init would make v == 0."""
    rng = np.random.default_rng(seed)  # numpy: no per-shape compiles, keeps the suite fast
    state = nnx.state(model, nnx.Param)
    pure = jax.tree.map(
        lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), nnx.to_pure_dict(state)
    )
    pure["source_embed"] = jnp.zeros_like(pure["source_embed"])
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def _jit_forward(model: nnx.Module) -> tuple[Forward, nnx.State]:
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, z, s, c: nnx.merge(graphdef, st)(z, s, c)), state


def _inputs(seed: int = 0) -> tuple[jax.Array, jax.Array, dict]:
    k = jax.random.split(jax.random.key(seed), 5)
    z = jax.random.normal(k[0], (B, SIDE, SIDE, CH))
    sigma = jax.random.uniform(k[1], (B,), minval=0.1, maxval=0.9)
    lengths = jnp.array([LT, 3, 5, 1])
    cond = {
        "text": jax.random.normal(k[2], (B, LT, TEXT_DIM)),
        "text_mask": jnp.arange(LT)[None] < lengths[:, None],
        "pooled": jax.random.normal(k[3], (B, 64)),
        "source": jax.random.normal(k[4], (B, SIDE, SIDE, CH)),
        "has_source": jnp.array([True, False, True, False]),
    }
    return z, sigma, cond


def _without_source(cond: dict) -> dict:
    return {k: v for k, v in cond.items() if k not in ("source", "has_source")}


@pytest.fixture(scope="module")
def tiny() -> tuple[MMDiT, Forward, nnx.State]:
    model = MMDiT(tiny_config(), rngs=nnx.Rngs(0))
    _randomize(model, seed=1)
    fwd, state = _jit_forward(model)
    return model, fwd, state


# --------------------------------------------------------------------------- MMDiT


def test_fresh_model_is_t2i_compatible_and_counted() -> None:
    model = MMDiT(tiny_config(), rngs=nnx.Rngs(0))
    assert model.source_embed.shape == (128,)
    np.testing.assert_array_equal(model.source_embed[...], 0.0)
    assert param_count(model) == 2_288_560
    spec = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    block = spec["transformer_blocks"][0]
    assert tuple(block["attn"]["to_q"]["kernel"].get_value()) == ("embed", "heads")
    assert tuple(block["ff"]["fc2"]["kernel"].get_value()) == ("mlp", "embed")


@pytest.mark.parametrize("with_source", [True, False])
def test_output_shape_dtype(tiny, with_source: bool) -> None:
    _, fwd, state = tiny
    z, sigma, cond = _inputs()
    v = fwd(state, z, sigma, cond if with_source else _without_source(cond))
    assert v.shape == z.shape and v.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(v))) and float(jnp.abs(v).max()) > 0


def test_source_used_only_where_present(tiny) -> None:
    _, fwd, state = tiny
    z, sigma, cond = _inputs()
    other = dict(cond, source=cond["source"] * -3.0 + 1.0)
    v1, v2 = fwd(state, z, sigma, cond), fwd(state, z, sigma, other)
    absent = ~cond["has_source"]
    # Masked keys get exactly zero attention weight: bitwise independence.
    np.testing.assert_array_equal(v1[absent], v2[absent])
    assert float(jnp.abs(v1[~absent] - v2[~absent]).max()) > 1e-3


def test_absent_source_matches_no_source_slot(tiny) -> None:
    _, fwd, state = tiny
    z, sigma, cond = _inputs()
    cond = dict(cond, has_source=jnp.zeros((B,), bool))
    v_slot = fwd(state, z, sigma, cond)
    v_plain = fwd(state, z, sigma, _without_source(cond))
    np.testing.assert_allclose(v_slot, v_plain, atol=1e-5)


def test_source_tokens_are_modulated_as_clean(tiny) -> None:
    """With source == z, zero source_embed and no text keys, the source tokens are
    exact duplicates of the target tokens iff both get the same time modulation;
    duplicated keys leave softmax attention unchanged, so the edit output then
    equals the no-source output. That holds at sigma = 0 and must break at
    sigma > 0, because source tokens are always modulated with sigma = 0."""
    _, fwd, state = tiny
    z, _, cond = _inputs()
    cond = dict(cond, source=z, has_source=jnp.ones((B,), bool), text_mask=jnp.zeros((B, LT), bool))
    for sigma, same in ((0.0, True), (0.7, False)):
        s = jnp.full((B,), sigma)
        v_edit = fwd(state, z, s, cond)
        v_plain = fwd(state, z, s, _without_source(cond))
        gap = float(jnp.abs(v_edit - v_plain).max())
        assert (gap < 1e-4) if same else (gap > 1e-2), (sigma, gap)


def test_text_padding_is_ignored(tiny) -> None:
    _, fwd, state = tiny
    z, sigma, cond = _inputs()
    noise = jax.random.normal(jax.random.key(9), cond["text"].shape) * 5.0
    padded = dict(cond, text=jnp.where(cond["text_mask"][..., None], cond["text"], noise))
    np.testing.assert_array_equal(fwd(state, z, sigma, cond), fwd(state, z, sigma, padded))
    real = dict(cond, text=cond["text"].at[:, 0].add(1.0))
    assert float(jnp.abs(fwd(state, z, sigma, real) - fwd(state, z, sigma, cond)).max()) > 1e-4


def test_bfloat16_compute_runs_close_to_float32(tiny) -> None:
    model, fwd, state = tiny
    bf16 = MMDiT(dataclasses.replace(model.config, dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(bf16, nnx.state(model, nnx.Param))
    z, sigma, cond = _inputs()
    v = nnx.jit(lambda m, z, s, c: m(z, s, c))(bf16, z, sigma, cond)
    ref = fwd(state, z, sigma, cond)
    assert v.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(v)))
    rel = float(jnp.linalg.norm(v - ref) / jnp.linalg.norm(ref))
    assert rel < 5e-2, rel


def test_sd35_dual_attention_qk_norm_and_remat() -> None:
    cfg = dataclasses.replace(tiny_config(depth=2), dual_attention_layers=(0,), qk_norm="rms_norm")
    model = MMDiT(cfg, rngs=nnx.Rngs(0))
    _randomize(model, seed=2)
    block = model.transformer_blocks[0]
    assert block.norm1.linear.kernel.shape == (128, 9 * 128)
    assert block.attn2.norm_q is not None and block.attn.norm_added_k is not None
    last = model.transformer_blocks[1]
    assert last.attn2 is None and last.attn.to_add_out is None and last.ff_context is None

    z, sigma, cond = _inputs()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    remat_graphdef, _, _ = nnx.split(
        MMDiT(dataclasses.replace(cfg, remat="block"), rngs=nnx.Rngs(0)), nnx.Param, ...
    )
    fwd = jax.jit(lambda c: nnx.merge(graphdef, params, rest)(z, sigma, c))
    v = fwd(cond)

    @jax.jit
    @jax.value_and_grad
    def remat_loss(p: nnx.State, z: jax.Array, sigma: jax.Array, cond: dict) -> jax.Array:
        return jnp.mean(nnx.merge(remat_graphdef, p, rest)(z, sigma, cond) ** 2)

    loss, grads = remat_loss(params, z, sigma, cond)
    np.testing.assert_allclose(loss, jnp.mean(v**2), rtol=1e-5)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # The dual-attention path must also keep absent sources out exactly.
    absent = ~cond["has_source"]
    np.testing.assert_array_equal(v[absent], fwd(dict(cond, source=-cond["source"]))[absent])


def test_timestep_embedding_is_cos_first() -> None:
    emb = timestep_embedding(jnp.array([0.0, 500.0]))
    assert emb.shape == (2, 256)
    np.testing.assert_array_equal(emb[0], jnp.concatenate([jnp.ones(128), jnp.zeros(128)]))
    np.testing.assert_allclose(emb[1, 0], np.cos(500.0), rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sample_size": 25}, "patch_size"),
        ({"caption_projection_dim": 100}, "caption_projection_dim"),
        ({"pos_embed_max_size": 2}, "pos_embed_max_size"),
        ({"dual_attention_layers": (7,)}, "dual_attention_layers"),
        ({"qk_norm": "layer_norm"}, "qk_norm"),
        ({"dtype": "int8"}, "dtype"),
        ({"coarse_scale": 4}, r"coarse_scale=4 must be 0 .* patch grid 6.*\[0, 1, 2, 3, 6\]"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    assert MMDiTConfig().inner_dim == 1152  # diffusers defaults (SD3 medium) are valid
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(tiny_config(), **overrides)


def test_input_validation(tiny) -> None:
    model, _, _ = tiny
    z, sigma, cond = _inputs()
    with pytest.raises(ValueError, match="channels-last"):
        model(jnp.moveaxis(z, -1, 1), sigma, cond)
    with pytest.raises(KeyError, match="pooled"):
        model(z, sigma, {k: v for k, v in cond.items() if k != "pooled"})


# --------------------------------------------------------------------------- coarse tokens


def test_coarse_tokens_pool_each_block_at_its_centre() -> None:
    """coarse_scale k appends one token per k x k block: the mean of the block's patch
    projections plus the sincos embedding of the block's centre (the mean of its patches'
    positions). At k = 1 every block is one patch, so the coarse tokens repeat the patch tokens."""
    z = jax.random.normal(jax.random.key(0), (2, SIDE, SIDE, CH))
    plain = PatchEmbed(tiny_config(), rngs=nnx.Rngs(0))
    fine = plain(z)  # [2, 36, 128]: a 6 x 6 grid of patch-4 tokens
    one = PatchEmbed(dataclasses.replace(tiny_config(), coarse_scale=1), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(one(z), jnp.concatenate([fine, fine], axis=1))

    two = PatchEmbed(dataclasses.replace(tiny_config(), coarse_scale=2), rngs=nnx.Rngs(0))
    tokens = two(z)
    assert tokens.shape == (2, 36 + 9, 128)
    np.testing.assert_array_equal(tokens[:, :36], fine)
    raw = plain.proj(z.reshape(2, 6, 4, 6, 4, CH).transpose(0, 1, 3, 2, 4, 5)
                     .reshape(2, 6, 6, -1))  # patch projections without positions
    blocks = raw.reshape(2, 3, 2, 3, 2, 128).mean(axis=(2, 4)).reshape(2, 9, 128)
    # The tiny config's grid is the whole sincos grid, in patch units: block (r, c) covers
    # patches 2r, 2r + 1 (rows) and 2c, 2c + 1 (columns).
    centre = np.arange(3) * 2 + 0.5
    cols, rows = np.meshgrid(centre, centre)
    np.testing.assert_allclose(tokens[:, 36:], blocks + _sincos_2d(128, cols, rows)[None],
                               atol=1e-5)


def test_coarse_tokens_join_attention_and_are_dropped_from_the_output(tiny) -> None:
    """No new parameters: the same weights run with and without coarse tokens, and the output
    is still one velocity per pixel; the coarse tokens change it (every attention sees them),
    and an absent source's coarse tokens are masked with its patch tokens."""
    model, fwd, state = tiny
    coarse = MMDiT(dataclasses.replace(tiny_config(), coarse_scale=2), rngs=nnx.Rngs(0))
    assert param_count(coarse) == param_count(model)
    nnx.update(coarse, nnx.state(model, nnx.Param))
    coarse_fwd, coarse_state = _jit_forward(coarse)
    z, sigma, cond = _inputs()
    v = coarse_fwd(coarse_state, z, sigma, cond)
    assert v.shape == z.shape and bool(jnp.all(jnp.isfinite(v)))
    assert float(jnp.abs(v - fwd(state, z, sigma, cond)).max()) > 1e-3
    absent = dict(cond, has_source=jnp.zeros((B,), bool))
    np.testing.assert_allclose(coarse_fwd(coarse_state, z, sigma, absent),
                               coarse_fwd(coarse_state, z, sigma, _without_source(cond)),
                               atol=1e-5)
    with pytest.raises(ValueError, match="patch_size \\* coarse_scale = 8"):
        coarse(z[:, :20, :20], sigma, _without_source(cond))  # patch-4 tokens, not 8 x 8 blocks


# --------------------------------------------------------------------------- CLIP

VOCAB, EOS, PAD = 50, 49, 0


@pytest.fixture(scope="module")
def clip() -> tuple[CLIPTextEncoder, Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]]:
    model = CLIPTextEncoder(tiny_text_config(VOCAB, max_len=12), rngs=nnx.Rngs(0))
    return model, functools.partial(nnx.jit(lambda m, ids, mask: m(ids, mask)), model)


def _ids(rows: list[list[int]], length: int = 12) -> tuple[jax.Array, jax.Array]:
    ids = np.full((len(rows), length), PAD, np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return jnp.asarray(ids), jnp.asarray(ids != PAD)


def test_clip_shapes_and_eos_pooling(clip) -> None:
    model, enc = clip
    assert model.config.eos_token_id == VOCAB - 1 == EOS
    ids, mask = _ids([[1, 5, 7, EOS], [1, 9, EOS], [1, 3, 4, 6, 8, EOS]])
    tokens, pooled = enc(ids, mask)
    assert tokens.shape == (3, 12, 64) and pooled.shape == (3, 64)
    at_eos = tokens[jnp.arange(3), jnp.array([3, 2, 5])]
    np.testing.assert_allclose(pooled, model.text_projection(at_eos), atol=1e-6)


def test_clip_padding_and_causality(clip) -> None:
    _, enc = clip
    ids, mask = _ids([[1, 5, 7, EOS]])
    tokens, pooled = enc(ids, mask)
    # Different ids in the padded tail leave real tokens and the pooled vector intact.
    junk = ids.at[0, 6:].set(33)
    tokens2, pooled2 = enc(junk, mask)
    np.testing.assert_array_equal(pooled, pooled2)
    np.testing.assert_array_equal(tokens[:, :4], tokens2[:, :4])
    # Causal: editing token 2 leaves tokens 0..1 unchanged but moves the EOS state.
    tokens3, pooled3 = enc(ids.at[0, 2].set(11), mask)
    np.testing.assert_array_equal(tokens[:, :2], tokens3[:, :2])
    assert float(jnp.abs(pooled - pooled3).max()) > 1e-4


def test_bidirectional_text_tokens_see_the_words_after_them(clip) -> None:
    """causal=False (model.text_bidirectional): the same weights, but an early token's output
    depends on a later word (the causal tower's does not), padding still ignored."""
    model, enc = clip
    both = CLIPTextEncoder(dataclasses.replace(model.config, causal=False), rngs=nnx.Rngs(0))
    nnx.update(both, nnx.state(model))
    ids, mask = _ids([[1, 5, 7, EOS]])
    tokens, _ = both(ids, mask)
    moved, _ = both(ids.at[0, 2].set(11), mask)
    assert float(jnp.abs(tokens[:, :2] - moved[:, :2]).max()) > 1e-4
    np.testing.assert_allclose(both(ids.at[0, 6:].set(33), mask)[0][:, :4], tokens[:, :4],
                               atol=1e-6)
    assert float(jnp.abs(tokens[:, 0] - enc(ids, mask)[0][:, 0]).max()) > 1e-4  # not causal's


def test_clip_without_eos_pools_last_real_token(clip) -> None:
    model, enc = clip
    ids, mask = _ids([[1, 5, 7]])
    tokens, pooled = enc(ids, mask)
    np.testing.assert_allclose(pooled, model.text_projection(tokens[:, 2]), atol=1e-6)


# --------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def base_params(tiny) -> dict:
    model, _, _ = tiny
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_lora_default_targets_and_zero_delta(tiny, base_params) -> None:
    model, fwd, state = tiny
    lora = init_lora(jax.random.key(0), base_params, rank=4)
    blocks = lora["transformer_blocks"]
    # 8 attention + 4 MLP kernels per block; the last block has no to_add_out/ff_context.
    assert len(jax.tree.leaves(lora)) == 2 * (12 * 3 + 9)
    last = {"to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj"}
    assert set(blocks[3]["attn"]) == last and set(blocks[3]) == {"attn", "ff"}
    merged = merge(base_params, lora, alpha=4.0)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base_params), strict=True):
        np.testing.assert_array_equal(a, b)
    # The documented jit path: merge inside the step, rebuild the model from a pure dict.
    graphdef, _ = nnx.split(model, nnx.Param)
    z, sigma, cond = _inputs()

    @jax.jit
    def apply(lora: dict) -> jax.Array:
        return nnx.merge(graphdef, nnx.State(merge(base_params, lora, 4.0)))(z, sigma, cond)

    np.testing.assert_allclose(apply(lora), fwd(state, z, sigma, cond), atol=1e-5)


def test_lora_merge_math(base_params) -> None:
    lora = init_lora(jax.random.key(1), base_params, rank=2, targets=r"0/attn/to_q/kernel$")
    kernel = base_params["transformer_blocks"][0]["attn"]["to_q"]["kernel"]
    entry = lora["transformer_blocks"][0]["attn"]["to_q"]["kernel"]
    assert entry["a"].shape == (128, 2) and entry["b"].shape == (2, 128)
    entry["b"] = jax.random.normal(jax.random.key(2), entry["b"].shape)
    merged = merge(base_params, lora, alpha=3.0)
    expected = kernel + 1.5 * np.asarray(entry["a"]) @ np.asarray(entry["b"])
    np.testing.assert_allclose(
        merged["transformer_blocks"][0]["attn"]["to_q"]["kernel"], expected, atol=1e-6
    )
    # Everything else is the very same array object (no copy of the base).
    assert merged["transformer_blocks"][1] is base_params["transformer_blocks"][1]
    assert merged["proj_out"] is base_params["proj_out"]


def test_lora_regex_without_match_raises(base_params) -> None:
    with pytest.raises(ValueError, match=r"nothing_here.*kernel"):
        init_lora(jax.random.key(0), base_params, rank=2, targets="nothing_here")


def test_scanned_layers_equal_the_unrolled_blocks() -> None:
    """scan_layers stacks each run of same-kind blocks (here dual x2, plain x2, last x1) and
    gives the unrolled model's outputs and gradients from the same (stacked) weights."""
    cfg = MMDiTConfig(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=5,
                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                      caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=8,
                      dual_attention_layers=(0, 1), qk_norm="rms_norm")
    scanned = dataclasses.replace(cfg, scan_layers=True, remat="dots")
    assert [(g.start, g.stop) for g in block_groups(cfg)] == [(0, 2), (2, 4), (4, 5)]
    graph, state = nnx.split(MMDiT(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                          nnx.to_pure_dict(state))
    s_graph, s_state = nnx.split(MMDiT(scanned, rngs=nnx.Rngs(0)))
    stacked = stack_blocks(params, cfg)
    kernel = nnx.to_pure_dict(nnx.get_partition_spec(s_state))["block_groups"][0]["attn"]
    assert kernel["to_q"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "heads")
    z = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
    cond = {"text": jax.random.normal(jax.random.key(1), (2, 5, 32)),
            "text_mask": jnp.ones((2, 5), bool), "pooled": jnp.ones((2, 16)), "source": z,
            "has_source": jnp.array([True, False])}

    def loss(graph, state, p):
        nnx.replace_by_pure_dict(state, p)
        return jnp.mean(nnx.merge(graph, state)(z, jnp.array([0.3, 0.8]), cond) ** 2)

    l_unrolled, g_unrolled = jax.value_and_grad(lambda p: loss(graph, state, p))(params)
    l_scanned, g_scanned = jax.value_and_grad(lambda p: loss(s_graph, s_state, p))(stacked)
    np.testing.assert_allclose(l_scanned, l_unrolled, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(unstack_blocks(g_scanned, cfg)), jax.tree.leaves(g_unrolled),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    back = unstack_blocks(stacked, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                     jax.tree.leaves(params), strict=True))


def _scan_pair() -> tuple[MMDiTConfig, MMDiTConfig, dict]:
    """An MMDiT-X config (groups: dual x2, plain x1, last x1), its scanned twin, and random
    unrolled params."""
    cfg = MMDiTConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                      caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=4,
                      dual_attention_layers=(0, 1), qk_norm="rms_norm")
    state = nnx.state(MMDiT(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                          nnx.to_pure_dict(state))
    return cfg, dataclasses.replace(cfg, scan_layers=True), params


def _random_factors(tree: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape).astype(np.float32), tree)


def test_lora_on_scanned_layers_init_merge_and_axes() -> None:
    """init_lora on the scanned layout gives stacked factors; merging them onto the stacked base
    equals merging their unstacked slices onto the unrolled base; axes keep the layers axis."""
    cfg, scanned, params = _scan_pair()
    stacked = stack_blocks(params, cfg)
    tree = init_lora(jax.random.key(0), stacked, rank=3)
    q = tree["block_groups"][0]["attn"]["to_q"]["kernel"]
    assert q["a"].shape == (2, 16, 3) and q["b"].shape == (2, 3, 16)
    assert not np.any(q["b"])  # a zero delta at init, as unscanned
    assert "attn2" in tree["block_groups"][0] and "transformer_blocks" not in tree

    tree = _random_factors(tree, 1)
    merged = unstack_blocks(merge(stacked, tree, 6.0), cfg)
    expected = merge(params, unstack_blocks(tree, cfg), 6.0)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)

    spec = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(
        nnx.eval_shape(lambda: MMDiT(scanned, rngs=nnx.Rngs(0))))))
    q_axes = lora.axes(spec, tree)["block_groups"][0]["attn"]["to_q"]["kernel"]
    P = jax.sharding.PartitionSpec
    assert q_axes == {"a": P("layers", "embed", "lora_rank"),
                      "b": P("layers", "lora_rank", "heads")}


def test_scanned_lora_model_equals_the_unrolled_one() -> None:
    """A LoRA loaded per block (mixed ranks, some blocks and targets without factors, as LoRA
    files may be) stacked with lora.stack_layers: the scanned model with it merged gives the
    unrolled model's output with the per-block LoRA merged."""
    cfg, scanned, params = _scan_pair()
    per_block = _random_factors(init_lora(jax.random.key(0), params, rank=2), 2)
    blocks = per_block["transformer_blocks"]
    blocks[1]["attn"]["to_k"]["kernel"] = _random_factors(
        {"a": np.zeros((16, 5)), "b": np.zeros((5, 16))}, 3)  # rank 5 in one block
    del blocks[0]["ff"]  # block 0 has no MLP factors, block 2 none at all
    del blocks[2]
    stacked = stack_blocks(per_block, cfg, stack=lora.stack_layers)
    assert stacked["block_groups"][0]["attn"]["to_k"]["kernel"]["a"].shape == (2, 16, 5)

    z = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    cond = {"text": jax.random.normal(jax.random.key(1), (2, 3, 16)),
            "text_mask": jnp.ones((2, 3), bool), "pooled": jnp.ones((2, 8))}
    sigma = jnp.array([0.3, 0.8])

    def forward(config: MMDiTConfig, p: dict) -> jax.Array:
        graph, state = nnx.split(nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0))))
        nnx.replace_by_pure_dict(state, p)
        return nnx.merge(graph, state)(z, sigma, cond)

    unrolled = forward(cfg, merge(params, per_block, 4.0))
    adapted = lora.adapted(stack_blocks(params, cfg), stacked, 4.0)
    np.testing.assert_allclose(forward(scanned, lora.resolve(adapted)), unrolled, atol=1e-5)
    assert not np.allclose(unrolled, forward(cfg, params), atol=1e-3)  # the LoRA does something

"""The student's options (issue 14): where it starts (training.init), the moving average of its
weights (training.ema_decay), K distinct query states, and LoRA with the source embedding
trained in full and PEFT's initialisation."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from danceopd_jax import worlds
from danceopd_jax.config import routes_of, validate
from danceopd_jax.core import methods, query
from danceopd_jax.data.store import load_params
from danceopd_jax.interop.diffusers_sd3 import SOURCE_EMBED_FILE
from danceopd_jax.jobs import distill
from danceopd_jax.jobs.export import export_lora
from danceopd_jax.jobs.workdir import load_student
from danceopd_jax.models import lora
from danceopd_jax.train.checkpoint import RunCheckpoints
from danceopd_jax.train.state import (
    TrainState,
    apply_if_finite,
    ema_decay_at,
    make_optimizer,
    params_ema,
    student_optimizer,
)
from danceopd_jax.train.student import initial_trainable, student_init, student_params_fn

# --- the moving average ---------------------------------------------------------------------

TINY_PARAMS = {"w": jnp.array([1.0, -2.0, 0.5]), "sub": {"b": jnp.array(3.0)}}


def _quadratic_step(optimizer: optax.GradientTransformation):
    """A jitted step on 0.5 |params - 1|^2 (gradient params - 1) with the trainer's update."""
    def step(state: TrainState) -> TrainState:
        grads = jax.tree.map(lambda p: p - 1.0, state.trainable)
        loss = sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))
        return apply_if_finite(state, grads, loss, optimizer)[0]
    return jax.jit(step)


def test_ema_follows_the_params_with_the_warmed_up_decay():
    optimizer = make_optimizer(0.1, 0.0, 0.0, ema_decay=0.9)
    state = TrainState.create(TINY_PARAMS, optimizer, 0)
    step = _quadratic_step(optimizer)
    want = jax.tree.map(np.asarray, TINY_PARAMS)
    for t in range(6):
        state = step(state)
        d = min(0.9, (1 + t) / (10 + t))
        assert float(ema_decay_at(0.9, jnp.asarray(t))) == pytest.approx(d)
        want = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * np.asarray(p), want,
                            state.trainable)
    for got, w in zip(jax.tree.leaves(state.eval_trainable()), jax.tree.leaves(want),
                      strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-6)
    assert not np.allclose(state.eval_trainable()["w"], state.trainable["w"])
    # a skipped (non-finite) update leaves the average alone
    nan = apply_if_finite(state, jax.tree.map(lambda p: p * jnp.nan, state.trainable),
                          jnp.nan, optimizer)[0]
    np.testing.assert_array_equal(params_ema(nan.opt_state)["w"], state.eval_trainable()["w"])
    # off: the params themselves, and the optimizer state has no average
    plain = TrainState.create(TINY_PARAMS, make_optimizer(0.1, 0.0, 0.0), 0)
    assert params_ema(plain.opt_state) is None and plain.eval_trainable() is plain.trainable


def test_ema_is_checkpointed_and_resumes_bit_exactly(tmp_path):
    optimizer = make_optimizer(0.1, 0.0, 1.0, warmup_steps=2, ema_decay=0.99)
    step = _quadratic_step(optimizer)
    straight = TrainState.create(TINY_PARAMS, optimizer, 0)
    for _ in range(4):
        straight = step(straight)
    half = TrainState.create(TINY_PARAMS, optimizer, 0)
    for _ in range(2):
        half = step(half)
    checkpoints = RunCheckpoints(tmp_path / "checkpoints")
    checkpoints.save(2, half, {"step": 2})
    resumed, _ = checkpoints.restore(TrainState.create(TINY_PARAMS, optimizer, 0))
    checkpoints.close()
    np.testing.assert_array_equal(params_ema(resumed.opt_state)["w"],
                                  params_ema(half.opt_state)["w"])
    for _ in range(2):
        resumed = step(resumed)
    for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(got, want)


# --- K distinct query states ----------------------------------------------------------------

def test_k_queries_are_distinct_and_the_first_follows_the_bias():
    n, k, draws = 8, 4, 20000
    idx = np.asarray(query.sample_query(jax.random.key(0), draws, n, k, "low"))
    assert idx.shape == (draws, k) and idx.min() >= 0 and idx.max() < n
    assert (np.diff(np.sort(idx, axis=1), axis=1) > 0).all()  # always K distinct states
    probs = query.index_probs(n, "low")
    assert probs.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(np.bincount(idx[:, 0], minlength=n) / draws, probs, atol=0.015)
    # the later draws are the bias renormalised over what is left: the semantic side is
    # still the most visited, and uniform queries cover every state K / N of the time
    counts = np.bincount(idx.ravel(), minlength=n)
    assert counts.argmax() >= n // 2 and counts[0] < counts[-2]
    uniform = np.asarray(query.sample_query(jax.random.key(1), draws, n, k, "uniform"))
    np.testing.assert_allclose(np.bincount(uniform.ravel(), minlength=n) / draws, k / n,
                               atol=0.02)
    shared = np.asarray(query.sample_query(jax.random.key(2), 5, n, k, "mid", shared=True))
    assert (shared == shared[:1]).all() and len(set(shared[0])) == k
    with pytest.raises(ValueError, match="K must be at most N"):
        query.sample_query(jax.random.key(0), 2, 4, 5, "low")


def test_one_query_is_drawn_as_before():
    """K = 1 is floor(N u), u ~ Beta, from the same key: the default losses do not move."""
    key = jax.random.key(3)
    got = query.sample_query(key, 64, 16, 1, "low")
    u = jax.random.beta(key, 5.0, 2.0, (64, 1))
    np.testing.assert_array_equal(got, np.clip(np.floor(16 * u), 0, 15).astype(np.int32))


# --- where the student starts ---------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny config's world with random teachers (an edit teacher unlike the anchor)."""
    world = worlds.build(tiny_config(), tmp_path_factory.mktemp("w"))
    anchor = world.init_backbone
    teachers = {"anchor": anchor, "joint_edit": jax.tree.map(lambda x: x * 1.5 + 0.01, anchor)}
    return world, teachers


def _assert_tree_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("lora_rank", [0, 2])
@pytest.mark.parametrize("init", ["anchor", "base", "joint_edit", "merge"])
def test_student_starts_from_its_init(world, init, lora_rank):
    world, teachers = world
    config = tiny_config(**{"training.init": init, "training.lora_rank": lora_rank,
                            "baselines.merge": "average", "routes.t2i.weight": 0.25,
                            "routes.edit.weight": 0.75})
    validate(config)
    # the route-weighted average of the teachers: anchor + 0.75 (joint_edit - anchor)
    merge = methods.merge_weights(teachers["anchor"], [teachers["joint_edit"]], [0.75])
    want = {"anchor": teachers["anchor"], "base": teachers["anchor"],
            "joint_edit": teachers["joint_edit"], "merge": merge}[init]
    init_weights = student_init(config, routes_of(config), teachers)
    trainable = initial_trainable(config, init_weights)
    params = student_params_fn(float(max(lora_rank, 1)))(trainable, {"init": init_weights})
    _assert_tree_equal(params, want)  # LoRA: a zero delta on the init weights
    if lora_rank:
        assert set(trainable) == {"lora", "full"}
        np.testing.assert_array_equal(trainable["full"]["source_embed"], want["source_embed"])
        assert trainable["full"]["source_embed"] is not want["source_embed"]  # never aliased
    else:
        assert set(trainable) == {"backbone"}


def test_merge_init_takes_the_merge_setting(world):
    """The student configs' init (config.paper_student): a task-arithmetic merge at its own
    scale (the anchor plus 1/2 of the teacher's delta), not the routes' shares."""
    world, teachers = world
    config = tiny_config(**{"training.init": "merge", "baselines.merge": "task_arithmetic",
                            "baselines.merge_scale": 0.5, "routes.t2i.weight": 0.25,
                            "routes.edit.weight": 0.75})
    validate(config)
    got = student_init(config, routes_of(config), teachers)
    half = jax.tree.map(lambda a, t: a + 0.5 * (t - a), teachers["anchor"],
                        teachers["joint_edit"])
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(half), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    three_quarters = methods.merge_weights(teachers["anchor"], [teachers["joint_edit"]], [0.75])
    assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(three_quarters)[0])


def test_bad_student_options_fail_validation():
    with pytest.raises(ValueError, match=r"training.init='jointedit' is unknown; use one of "
                                         r"\['anchor', 'base', 'merge'\].*'joint_edit'"):
        validate(tiny_config(**{"training.init": "jointedit"}))
    with pytest.raises(ValueError, match="ema_decay=1.0"):
        validate(tiny_config(**{"training.ema_decay": 1.0}))
    with pytest.raises(ValueError, match="lora_full='\\(' is not a regex"):
        validate(tiny_config(**{"training.lora_full": "("}))


def test_lora_full_must_select_params_lora_leaves_alone(world):
    world, teachers = world
    for pattern, match in [("nothing_here", "matches no param"),
                           ("to_q/kernel", "LoRA already adapts")]:
        config = tiny_config(**{"training.lora_rank": 2, "training.lora_full": pattern})
        with pytest.raises(ValueError, match=match):
            initial_trainable(config, teachers["anchor"])


# --- LoRA: PEFT's initialisation, and the source embedding trained in full ------------------

def test_lora_init_is_peft_gaussian():
    base = {"blk": {"attn": {"to_q": {"kernel": jnp.ones((512, 256))}}}}
    rank = 8
    tree = lora.init_lora(jax.random.key(0), base, rank)
    a, b = (np.asarray(tree["blk"]["attn"]["to_q"]["kernel"][k]) for k in "ab")
    assert a.shape == (512, rank) and b.shape == (rank, 256)
    assert a.std() == pytest.approx(1 / rank, rel=0.03) and abs(a.mean()) < 0.005
    assert not b.any()
    _assert_tree_equal(lora.merge(base, tree, alpha=16.0), base)  # the delta is zero
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(512, 256)),
                                peft.LoraConfig(r=rank, target_modules=["0"],
                                                init_lora_weights="gaussian"))
    theirs = model.base_model.model[0].lora_A["default"].weight.detach().numpy()
    assert theirs.std() == pytest.approx(a.std(), rel=0.05)  # the installed PEFT's gaussian


@pytest.mark.slow
def test_lora_student_from_a_teacher_trains_its_source_embedding_with_an_ema(trained, tmp_path):
    """A LoRA student started from the edit teacher, with a moving average: the step trains
    the source embedding in full, the checkpoint keeps the average, and load_student (sample,
    evaluate, export) rebuilds the averaged student on the teacher's weights; export_lora
    writes the source embedding beside the factors."""
    shutil.copytree(trained[0] / "teachers", tmp_path / "teachers")
    config = tiny_config(**{"training.lora_rank": 2, "training.init": "joint_edit",
                            "training.ema_decay": 0.5, "training.steps": 2,
                            "training.warmup_steps": 0, "training.lr": 1e-2,
                            "eval.final_scores": False})
    distill.run(config, tmp_path)
    student = load_student(tmp_path)
    edit = load_params(tmp_path / "teachers" / "joint_edit", {"backbone": student.anchor})[0]
    edit = edit["backbone"]
    assert set(student.full) == {"source_embed"}
    assert not np.array_equal(student.full["source_embed"], edit["source_embed"])  # trained
    merged = lora.overlay(lora.merge(edit, student.lora, student.lora_alpha), student.full)
    _assert_tree_equal(student.params, merged)  # on the teacher's weights, not the anchor's
    np.testing.assert_array_equal(student.params["pos_embed"]["proj"]["kernel"],
                                  edit["pos_embed"]["proj"]["kernel"])
    like = TrainState.create(initial_trainable(config, edit),
                             student_optimizer(config.training), config.training.seed)
    raw = RunCheckpoints(tmp_path / "checkpoints").restore(like)[0]
    _assert_tree_equal(student.full, params_ema(raw.opt_state)["full"])  # the average...
    assert not np.array_equal(student.full["source_embed"],
                              raw.trainable["full"]["source_embed"])  # ...not the weights
    path = export_lora(student, tmp_path / "lora")
    np.testing.assert_array_equal(np.load(path.parent / SOURCE_EMBED_FILE),
                                  student.full["source_embed"])


"""The student's parameters: where it starts (training.init), what it trains (a full copy, or
LoRA factors plus the few base params it trains in full), how its field's params are formed
from (trainable, frozen), and its update for config.method (the method registry's record).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.tree_util import keystr, tree_flatten_with_path

from danceopd_jax.config import (
    init_teacher,
)
from danceopd_jax.core.fields import cfg
from danceopd_jax.core.methods import Setting, get_method, merge_coefficients, merge_weights
from danceopd_jax.core.routing import Route
from danceopd_jax.models import lora
from danceopd_jax.models.wiring import Models
from danceopd_jax.train.loop import Update
from danceopd_jax.train.step import StudentParams, make_distill_step, make_flow_matching_step

Params = Any


def student_params_fn(lora_alpha: float):
    """How the student's field params come from (trainable, frozen).

    Full fine-tuning trains a copy of the weights it starts from ("backbone"). LoRA trains
    low-rank factors ("lora") merged onto its frozen base, frozen["init"] (the weights it starts
    from: the anchor's or a teacher's own params, shared with frozen["teachers"], or the
    teachers' merge), plus the few base params it trains in full ("full": the source
    embedding), which replace the base's."""
    def student_params(trainable: Params, frozen: Params) -> Params:
        if "lora" in trainable:
            merged = lora.merge(lora.resolve(frozen["init"]), trainable["lora"], lora_alpha)
            return lora.overlay(merged, trainable.get("full", {}))
        return trainable["backbone"]
    return student_params


def method_update(config: ml_collections.ConfigDict, routes: list[Route], models: Models,
                  student_params: StudentParams, optimizer, sigmas: jax.Array, shards: int,
                  shardings, frozen: Params, bucket_has_source: dict[str, bool]) -> Update:
    """The student's update for config.method (its record in the method registry): (state,
    batch, slots) -> (state, metrics), the same optimizer and batches for every method."""
    method = get_method(config.method)
    field = models.field()
    if method.train == "flow_matching":  # on the routed batch's ground truth
        fm_step = make_flow_matching_step(field, student_params, models.conditioner(), optimizer,
                                          shardings=shardings)
        return lambda state, batch, slots: fm_step(state, frozen, batch, ())
    if method.train != "distill":
        raise ValueError(f"method {config.method!r} has no training step ({method.train}: "
                         "run() builds the student without optimisation).")
    objective = method.objective(Setting(
        field, [cfg(field, r.cfg_alpha) for r in routes], routes,
        [bucket_has_source[r.bucket] for r in routes], sigmas, shards,
        config.danceopd.to_dict(), config.baselines.to_dict()))
    step = make_distill_step(objective, student_params, [r.teacher for r in routes],
                             models.conditioner(), optimizer, shardings)
    return lambda state, batch, slots: step(state, frozen, batch, slots)


def merged_teachers(config: ml_collections.ConfigDict, routes: list[Route],
                    frozen: Params) -> Params:
    """The weight-merging student: anchor + sum_m lambda_m (teacher_m - anchor)."""
    b, teachers = config.baselines, frozen["teachers"]
    coefficients = merge_coefficients(routes, b.merge, b.merge_scale)
    return merge_weights(teachers["anchor"], [lora.resolve(teachers[n]) for n in coefficients],
                         list(coefficients.values()))


def init_sources(config: ml_collections.ConfigDict, routes: list[Route]) -> list[str]:
    """The teachers student_init reads."""
    name = init_teacher(config)
    return ["anchor", *(r.teacher for r in routes)] if name is None else [name]


def student_init(config: ml_collections.ConfigDict, routes: list[Route],
                 teachers: dict[str, Params]) -> Params:
    """The weights the student starts from (training.init): a teacher's own params (the
    anchor's by default; a LoRA teacher's are lora.adapted), or the routed teachers' weight
    merge, made as the weight_merge baseline makes it (config.baselines.merge)."""
    name = init_teacher(config)
    if name is None:
        return merged_teachers(config, routes, {"teachers": teachers})
    return teachers[name]


def initial_trainable(config: ml_collections.ConfigDict, init: Params,
                      lora_targets: str = lora.DEFAULT_TARGETS) -> Params:
    """The student at `init` (student_init): a full copy, or LoRA factors with a zero delta on
    the kernels `lora_targets` matches (the backbone's, Models.lora_targets) plus copies of the
    base params it trains in full (training.lora_full) under "full"."""
    tc = config.training
    weights = lora.resolve(init)

    def copy(tree: Params) -> Params:
        return jax.tree.map(jnp.copy, tree)  # donated by the step: never alias the base

    if tc.lora_rank <= 0:
        return {"backbone": copy(weights)}
    factors = lora.init_lora(jax.random.key(tc.seed), weights, tc.lora_rank, lora_targets)
    pattern = tc.get("lora_full", "")  # a workdir's config.json from before it: none
    full = lora.select(weights, pattern)
    if pattern and not full:
        raise ValueError(f"training.lora_full={pattern!r} matches no param of the backbone; "
                         f"fix the regex (top-level params: {sorted(weights)}), or set it to "
                         "'' to train only the LoRA factors.")
    both = {keystr(p[:-1]) for p, _ in tree_flatten_with_path(factors)[0]} & {
        keystr(p) for p, _ in tree_flatten_with_path(full)[0]}
    if both:
        raise ValueError(f"training.lora_full={pattern!r} selects kernels that LoRA already "
                         f"adapts ({sorted(both)[:4]}); narrow the regex to params LoRA leaves "
                         "frozen (e.g. source_embed, biases, norms).")
    return {"lora": factors, **({"full": copy(full)} if full else {})}

"""Functional LoRA over a frozen, shared base; backbone-agnostic.

Everything works on *pure* nested parameter dicts, i.e.
``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (list indices appear as int
keys). Paths are the keys joined by ``/``, e.g.
``transformer_blocks/0/attn/to_q/kernel``.

A LoRA tree mirrors the base tree but holds only the adapted kernels, each
replaced by ``{"a": [in, rank], "b": [rank, out]}``. Kernels of scanned layers
carry a leading layers axis (``[layers, in, out]``: MMDiT's ``block_groups``),
and so do their factors (``[layers, in, rank]``, ``[layers, rank, out]``).
``merge`` is pure and cheap enough to run inside ``jit`` every step, so only one
copy of the base is ever kept, however many LoRA adapters (student, teachers)
share it::

    graphdef, base = nnx.split(model, nnx.Param)
    base = nnx.to_pure_dict(base)
    lora = init_lora(key, base, rank=16)

    def apply(lora, z, sigma, cond):
        state = nnx.State(merge(base, lora, alpha=16.0))
        return nnx.merge(graphdef, state)(z, sigma, cond)

A frozen LoRA teacher is ``adapted(base, tree, alpha)``: its params name the shared base
instead of copying it, and ``resolve`` merges them where the field runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

# Attention projections (joint + dual) and both MLPs of every MMDiT block.
DEFAULT_TARGETS = (
    r"attn2?/(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)/kernel$"
    r"|ff(_context)?/(fc1|fc2)/kernel$"
)

PyTree = dict[Any, Any]


def _kernels(tree: PyTree, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Yield (key path, leaf) for every leaf of 2 or more dimensions (a kernel, or a stack of
    kernels along leading axes), depth first."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _kernels(v, (*prefix, k))
        elif getattr(v, "ndim", 0) >= 2:
            yield (*prefix, k), v


def _path(keys: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in keys)


def _set(tree: PyTree, keys: tuple[Any, ...], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def init_lora(key: jax.Array, params: PyTree, rank: int, targets: str = DEFAULT_TARGETS) -> PyTree:
    """LoRA factors for every kernel whose path matches ``targets`` (``re.search``); a
    stacked kernel ``[..., in, out]`` gets stacked factors.

    PEFT's ``init_lora_weights="gaussian"`` (the reference's): ``a`` ~ N(0, (1/rank)^2),
    ``b`` = 0, so the initial delta is exactly zero.
    """
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1.")
    pattern = re.compile(targets)
    kernels = list(_kernels(params))
    matched = [(keys, w) for keys, w in kernels if pattern.search(_path(keys))]
    if not matched:
        examples = ", ".join(_path(keys) for keys, _ in kernels[:8])
        raise ValueError(
            f"LoRA targets regex {targets!r} matched no kernel; fix the regex. "
            f"Available paths include: {examples}"
        )
    lora: PyTree = {}
    for sub, (keys, w) in zip(jax.random.split(key, len(matched)), matched, strict=True):
        *lead, fan_in, fan_out = w.shape
        a = jax.random.normal(sub, (*lead, fan_in, rank), jnp.float32) / rank
        _set(lora, keys, {"a": a, "b": jnp.zeros((*lead, rank, fan_out), jnp.float32)})
    return lora


def merge(params: PyTree, lora: PyTree, alpha: float) -> PyTree:
    """``params`` with ``kernel + (alpha / rank) * a @ b`` on every LoRA'd kernel.

    Pure: untouched subtrees are shared, not copied.
    """
    out = dict(params)
    for k, sub in lora.items():
        if k not in params:
            raise KeyError(f"LoRA key {k!r} is not in the base params; was it built for them?")
        base = params[k]
        if isinstance(base, dict):
            out[k] = merge(base, sub, alpha)
        else:
            a, b = sub["a"], sub["b"]
            delta = (alpha / a.shape[-1]) * (a @ b)  # batched over stacked layers
            out[k] = (base + delta).astype(base.dtype)
    return out


def select(params: PyTree, pattern: str) -> PyTree:
    """The leaves of ``params`` whose path matches ``pattern`` (``re.search``), as a tree of
    the same nesting; ``""`` selects nothing. What a LoRA model trains in full beside its
    factors (PEFT's ``modules_to_save``)."""
    if not pattern:
        return {}
    regex = re.compile(pattern)

    def walk(tree: PyTree, prefix: tuple[Any, ...]) -> PyTree:
        out: PyTree = {}
        for k, v in tree.items():
            keys = (*prefix, k)
            if isinstance(v, dict):
                if sub := walk(v, keys):
                    out[k] = sub
            elif regex.search(_path(keys)):
                out[k] = v
        return out
    return walk(params, ())


def pick(tree: PyTree, like: PyTree) -> PyTree:
    """The entries of ``tree`` at the paths of ``like`` (e.g. the logical axes of a
    ``select``-ed subtree)."""
    return {k: pick(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def overlay(params: PyTree, partial: PyTree) -> PyTree:
    """``params`` with the leaves of ``partial`` (a tree of the same nesting) in place of
    theirs. Pure: untouched subtrees are shared, not copied."""
    out = dict(params)
    for k, v in partial.items():
        if k not in params:
            raise KeyError(f"{k!r} is not in the params; was the subtree selected from them?")
        out[k] = overlay(params[k], v) if isinstance(v, dict) else v
    return out


def adapted(base: PyTree, lora: PyTree, alpha: float) -> PyTree:
    """A frozen LoRA model's params: the base (shared, never copied) and its factors.
    ``resolve`` turns it into plain params inside the field."""
    return {"base": base, "lora": lora, "alpha": jnp.asarray(alpha, jnp.float32)}


def is_adapted(params: Any) -> bool:
    return isinstance(params, dict) and params.keys() == {"base", "lora", "alpha"}


def resolve(params: PyTree) -> PyTree:
    """Plain params: ``adapted(...)`` merged, anything else unchanged."""
    if is_adapted(params):
        return merge(params["base"], params["lora"], params["alpha"])
    return params


def stack_layers(layers: Sequence[PyTree]) -> PyTree:
    """Per-layer LoRA trees -> one tree of factors with a leading layers axis (the layout of
    scanned layers). A kernel adapted in only some layers gets zero factors in the others, and
    smaller ranks are zero-padded to the largest with ``b`` scaled by ``largest / rank``, so
    every layer's delta ``(alpha / rank) a @ b`` is unchanged."""
    out: PyTree = {}
    keys = list(dict.fromkeys(k for layer in layers for k in layer))
    for k in keys:
        subs = [layer.get(k) for layer in layers]
        present = [s for s in subs if s is not None]
        if "a" not in present[0] or isinstance(present[0]["a"], dict):
            out[k] = stack_layers([s or {} for s in subs])
            continue
        rank = max(s["a"].shape[-1] for s in present)
        (*_, fan_in, _), (*_, fan_out) = present[0]["a"].shape, present[0]["b"].shape
        a_parts, b_parts = [], []
        for s in subs:
            if s is None:
                a_parts.append(jnp.zeros((fan_in, rank), jnp.float32))
                b_parts.append(jnp.zeros((rank, fan_out), jnp.float32))
                continue
            pad = rank - s["a"].shape[-1]
            a_parts.append(jnp.pad(jnp.asarray(s["a"], jnp.float32), ((0, 0), (0, pad))))
            b_parts.append(jnp.pad(jnp.asarray(s["b"], jnp.float32) * (rank / s["a"].shape[-1]),
                                   ((0, pad), (0, 0))))
        out[k] = {"a": jnp.stack(a_parts), "b": jnp.stack(b_parts)}
    return out


def axes(base_axes: PyTree, lora: PyTree) -> PyTree:
    """Logical axis names of a LoRA tree: ``a`` keeps its kernel's input axis, ``b`` its
    output axis (both keep any leading layers axis), and the rank axis is "lora_rank", so LoRA
    shards like the base it adapts."""
    out: PyTree = {}
    for k, sub in lora.items():
        base = base_axes[k]
        if "a" in sub and "b" in sub and not isinstance(sub["a"], dict):
            ndim = len(sub["a"].shape)
            names = tuple(base) + (None,) * (ndim - len(tuple(base)))
            out[k] = {"a": PartitionSpec(*names[:-1], "lora_rank"),
                      "b": PartitionSpec(*names[:-2], "lora_rank", names[-1])}
        else:
            out[k] = axes(base, sub)
    return out


def adapted_axes(base_axes: PyTree, params: PyTree) -> PyTree:
    """Logical axes of ``adapted(...)`` params (the base's, the factors', a scalar alpha)."""
    return {"base": base_axes, "lora": axes(base_axes, params["lora"]),
            "alpha": PartitionSpec()}

"""Functional LoRA over a frozen, shared base; backbone-agnostic.

Everything works on *pure* nested parameter dicts, i.e.
``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (list indices appear as int
keys). Paths are the keys joined by ``/``, e.g.
``transformer_blocks/0/attn/to_q/kernel``.

A LoRA tree mirrors the base tree but holds only the adapted kernels, each
replaced by ``{"a": [in, rank], "b": [rank, out]}``. ``merge`` is pure and
cheap enough to run inside ``jit`` every step, so only one copy of the base is
ever kept, however many LoRA adapters (student, teachers) share it::

    graphdef, base = nnx.split(model, nnx.Param)
    base = nnx.to_pure_dict(base)
    lora = init_lora(key, base, rank=16)

    def apply(lora, z, sigma, cond):
        state = nnx.State(merge(base, lora, alpha=16.0))
        return nnx.merge(graphdef, state)(z, sigma, cond)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
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
    """Yield (key path, leaf) for every 2-D leaf, depth first."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _kernels(v, (*prefix, k))
        elif getattr(v, "ndim", None) == 2:
            yield (*prefix, k), v


def _path(keys: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in keys)


def _set(tree: PyTree, keys: tuple[Any, ...], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def init_lora(key: jax.Array, params: PyTree, rank: int, targets: str = DEFAULT_TARGETS) -> PyTree:
    """LoRA factors for every 2-D kernel whose path matches ``targets`` (``re.search``).

    ``a`` ~ N(0, 1/in) (fan-in scaled, so the update's scale does not depend on
    ``rank``); ``b`` = 0, so the initial delta is exactly zero.
    """
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1.")
    pattern = re.compile(targets)
    kernels = list(_kernels(params))
    matched = [(keys, w) for keys, w in kernels if pattern.search(_path(keys))]
    if not matched:
        examples = ", ".join(_path(keys) for keys, _ in kernels[:8])
        raise ValueError(
            f"LoRA targets regex {targets!r} matched no 2-D kernel; fix the regex. "
            f"Available paths include: {examples}"
        )
    lora: PyTree = {}
    for sub, (keys, w) in zip(jax.random.split(key, len(matched)), matched, strict=True):
        fan_in, fan_out = w.shape
        a = jax.random.normal(sub, (fan_in, rank), jnp.float32) / jnp.sqrt(fan_in)
        _set(lora, keys, {"a": a, "b": jnp.zeros((rank, fan_out), jnp.float32)})
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
            delta = (alpha / a.shape[1]) * (a @ b)
            out[k] = (base + delta).astype(base.dtype)
    return out


def axes(base_axes: PyTree, lora: PyTree) -> PyTree:
    """Logical axis names of a LoRA tree: ``a`` keeps its kernel's input axis, ``b`` its
    output axis, and the rank axis is "lora_rank", so LoRA shards like the base it adapts."""
    out: PyTree = {}
    for k, sub in lora.items():
        base = base_axes[k]
        if "a" in sub and "b" in sub and not isinstance(sub["a"], dict):
            names = tuple(base) + (None,) * (2 - len(tuple(base)))
            out[k] = {"a": PartitionSpec(names[0], "lora_rank"),
                      "b": PartitionSpec("lora_rank", names[1])}
        else:
            out[k] = axes(base, sub)
    return out

"""Pieces shared by the checkpoint converters.

Params are the nested dicts of ``nnx.to_pure_dict(nnx.state(model))``; a ``ParamPath`` is
one leaf's key tuple, e.g. ``("transformer_blocks", 0, "attn", "to_q", "kernel")`` (list
indices are ints). Converted arrays are float32 numpy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

ParamPath = tuple[str | int, ...]
Converter = Callable[[str, np.ndarray], tuple[ParamPath, np.ndarray]]
Exporter = Callable[[ParamPath, np.ndarray], tuple[str, np.ndarray]]

_MAX_LISTED = 12


def to_numpy(tensor: Any) -> np.ndarray:
    """float32 numpy from a numpy / JAX array or a torch tensor (any float dtype or device)."""
    if hasattr(tensor, "detach"):  # torch.Tensor, recognised without importing torch
        tensor = tensor.detach().cpu().float().numpy()
    return np.asarray(tensor, np.float32)


def path_from_dotted(module: str, leaf: str) -> ParamPath:
    """``("a.0.b", "kernel")`` -> ``("a", 0, "b", "kernel")``: digits are list indices."""
    return (*(int(p) if p.isdigit() else p for p in module.split(".") if p), leaf)


def kernel_from_weight(name: str, weight: np.ndarray) -> np.ndarray:
    """torch ``Linear.weight`` ``[out, in]`` -> flax ``kernel`` ``[in, out]``."""
    if weight.ndim != 2:
        raise ValueError(f"{name}: a Linear weight must be 2-D [out, in], got shape {weight.shape}")
    return weight.T


def linear_entry(path: ParamPath, name: str, tensor: Any) -> tuple[ParamPath, np.ndarray]:
    """(our path, float32 array in our layout) of a state-dict entry `name` whose kernels are
    torch Linear weights (transposed into ours)."""
    array = to_numpy(tensor)
    return path, kernel_from_weight(name, array) if path[-1] == "kernel" else array


def flatten(tree: Mapping) -> dict[ParamPath, Any]:
    """Nested dict -> ``{path: leaf}``."""
    flat: dict[ParamPath, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update({(key, *path): leaf for path, leaf in flatten(value).items()})
        else:
            flat[(key,)] = value
    return flat


def unflatten(flat: Mapping[ParamPath, Any]) -> dict:
    """``{path: leaf}`` -> nested dict (the inverse of ``flatten``)."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def param_shapes(factory: Callable[[nnx.Rngs], nnx.Module]) -> dict[ParamPath, tuple[int, ...]]:
    """Every parameter's path and shape, from an abstract (never allocated) model."""
    model = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {path: tuple(leaf.shape) for path, leaf in flatten(state).items()}


def raise_on_mismatch(
    what: str, missing: list[str], unexpected: list[str], misshaped: list[str], fix: str
) -> None:
    """One ``ValueError`` naming every missing, unexpected and mis-shaped key (if any)."""
    lines = []
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("mis-shaped", misshaped)):
        if keys:
            shown = keys[:_MAX_LISTED]
            if len(keys) > _MAX_LISTED:
                shown.append(f"... and {len(keys) - _MAX_LISTED} more")
            lines.append(f"  {label} ({len(keys)}):" + "".join(f"\n    {k}" for k in shown))
    if lines:
        raise ValueError(f"{what} does not match the config:\n" + "\n".join(lines) + f"\n{fix}")


def assemble(
    tensors: Iterable[tuple[str, Any]],
    path_of: Callable[[str], ParamPath],
    convert: Converter,
    export: Exporter,
    expected: Mapping[ParamPath, tuple[int, ...]],
    what: str,
    fix: str,
) -> dict:
    """Convert ``(checkpoint name, tensor)`` pairs with ``convert`` into our nested params.

    ``path_of`` is ``convert``'s name mapping alone; ``export`` (our path -> checkpoint name)
    names the missing keys and the expected checkpoint-layout shapes. Every key of
    ``expected`` must be produced, with its shape.
    """
    flat: dict[ParamPath, np.ndarray] = {}
    unexpected: list[str] = []
    misshaped: list[str] = []
    found: set[ParamPath] = set()
    for name, tensor in tensors:
        path = path_of(name)
        if path not in expected:
            unexpected.append(name)
            continue
        found.add(path)
        tensor = to_numpy(tensor)
        try:
            array = convert(name, tensor)[1]
            fits = array.shape == expected[path]
        except ValueError:  # a rank the layout conversion cannot take
            fits = False
        if fits:
            flat[path] = array
        else:
            # np.empty of a known shape only reserves memory; the layout ops are views.
            want = export(path, np.empty(expected[path], np.float32))[1].shape
            misshaped.append(f"{name}: shape {tensor.shape}, expected {want}")
    missing = [export(p, np.empty(s, np.float32))[0] for p, s in expected.items() if p not in found]
    raise_on_mismatch(what, missing, unexpected, misshaped, fix)
    return unflatten(flat)


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the model folder that holds config.json.")
    return json.loads(path.read_text())


def iter_safetensors(directory: str | os.PathLike, stem: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, float32 array)`` from ``{stem}.safetensors`` or, shard by shard, from the
    files listed in ``{stem}.safetensors.index.json``: one shard open at a time, one tensor
    read at a time.

    Tensors are read through safetensors' flax framework on the CPU device, because numpy has
    no bfloat16 (a common dtype of released checkpoints); the result is float32 numpy.
    """
    directory = Path(directory)
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        shards = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = [directory / shard for shard in dict.fromkeys(weight_map.values())]
    else:
        raise FileNotFoundError(
            f"{directory} has neither {single.name} nor {index.name}; pass the folder that holds "
            "the model's config.json and safetensors weights."
        )
    cpu = jax.devices("cpu")[0]
    for shard in shards:
        with safe_open(shard, framework="flax") as f:
            for name in f.keys():
                with jax.default_device(cpu):
                    tensor = f.get_tensor(name)
                yield name, np.asarray(tensor, np.float32)


def rename_module(module: str, pairs: Iterable[tuple[str, str]]) -> str:
    """`module` with the first (old, new) pair whose old is it or its dotted tail replaced."""
    for old, new in pairs:
        if module == old or module.endswith("." + old):
            return module[: len(module) - len(old)] + new
    return module

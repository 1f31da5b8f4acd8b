"""diffusers ``ZImageTransformer2DModel`` <-> our ``ZImage`` (models/zimage.py).

One key mapper (``to_ours`` / ``to_diffusers``) serves the loader, the state-dict converter,
the exporter and the parity tests. Module names mirror diffusers, so the mapping is:

* Linear ``weight`` ``[out, in]`` <-> ``kernel`` ``[in, out]`` (transposed); RMSNorm ``weight``
  <-> ``scale`` (every module whose name holds "norm"); ``bias`` and the ``*_pad_token``
  parameters unchanged.
* ``all_x_embedder.{p}-1`` <-> ``x_embedder``; ``all_final_layer.{p}-1`` <-> ``final_layer``
  and its ``adaLN_modulation.1`` <-> ``adaLN_modulation``; a block's ``adaLN_modulation.0`` <->
  ``adaLN_modulation``; ``attention.to_out.0`` <-> ``attention.to_out``;
  ``t_embedder.mlp.0`` / ``.2`` <-> ``t_embedder.linear_1`` / ``linear_2``;
  ``cap_embedder.0`` / ``.1`` <-> ``cap_embedder.norm`` / ``linear`` (also ``siglip_embedder``);
  ``layers.<i>`` <-> ``("layers", i)`` (and the refiners').

Running our model like diffusers': ``z`` is channels-last ``[B, H, W, C]`` (diffusers: a list
of ``[C, 1, H, W]``), ``sigma = 1 - t`` and our output is diffusers' negated (models/zimage.py).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from danceopd_jax.interop._common import (
    ParamPath,
    assemble,
    flatten,
    iter_safetensors,
    kernel_from_weight,
    param_shapes,
    path_from_dotted,
    raise_on_mismatch,
    read_config,
    rename_module,
    to_numpy,
)
from danceopd_jax.interop.peft_lora import LoraNames
from danceopd_jax.models.zimage import ZImage, ZImageConfig

CLASS_NAME = "ZImageTransformer2DModel"
WEIGHTS_STEM = "diffusion_pytorch_model"
# ZImageConfig fields that diffusers' config.json carries under the same names (and defaults);
# dtype, remat, scan_layers and attention are ours only.
_DIFFUSERS_FIELDS = (
    "all_patch_size", "all_f_patch_size", "in_channels", "dim", "n_layers", "n_refiner_layers",
    "n_heads", "n_kv_heads", "norm_eps", "qk_norm", "cap_feat_dim", "siglip_feat_dim",
    "rope_theta", "t_scale", "axes_dims", "axes_lens",
)
_TUPLES = ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens")
_PATCHED = re.compile(r"^all_(x_embedder|final_layer)\.(\d+)-1(?=\.|$)")
# (diffusers module suffix, ours), both ways except adaLN_modulation (see below).
_RENAMES = (
    ("to_out.0", "to_out"), ("mlp.0", "linear_1"), ("mlp.2", "linear_2"),
    ("cap_embedder.0", "cap_embedder.norm"), ("cap_embedder.1", "cap_embedder.linear"),
    ("siglip_embedder.0", "siglip_embedder.norm"),
    ("siglip_embedder.1", "siglip_embedder.linear"),
)
_FIX = (
    "Fix: use the config.json that belongs to these weights (n_layers, n_refiner_layers, "
    "siglip_feat_dim, the patch size and the widths must match) and a diffusers "
    f"{CLASS_NAME} folder (e.g. <pipeline>/transformer)."
)


# --------------------------------------------------------------------------- config


def config_from_diffusers(config: Mapping[str, Any]) -> ZImageConfig:
    """diffusers ``config.json`` dict -> ``ZImageConfig`` (absent fields take diffusers'
    defaults, which are ours)."""
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise ValueError(f"config _class_name is {name!r}, not {CLASS_NAME!r}; pass a Z-Image "
                         "transformer folder.")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_FIELDS)
    if unknown:
        raise ValueError(f"diffusers transformer config has unsupported fields {unknown}; only "
                         f"{CLASS_NAME} configs with fields {_DIFFUSERS_FIELDS} can be converted.")
    fields = {k: v for k, v in config.items() if k in _DIFFUSERS_FIELDS}
    for key in _TUPLES:
        if key in fields:
            fields[key] = tuple(fields[key])
    return ZImageConfig(**fields)


def config_to_diffusers(config: ZImageConfig) -> dict[str, Any]:
    """``ZImageConfig`` -> diffusers ``config.json`` dict (our-only fields are dropped)."""
    fields = {k: getattr(config, k) for k in _DIFFUSERS_FIELDS}
    fields.update({k: list(fields[k]) for k in _TUPLES})
    return {"_class_name": CLASS_NAME, **fields}


# --------------------------------------------------------------------------- key mapper


def our_path(name: str, *, patch_size: int) -> ParamPath:
    """diffusers state-dict name -> our param path (names only). A name of another patch size
    (``all_x_embedder.4-1``) keeps its name, so it is reported as unexpected."""
    module, _, leaf = name.rpartition(".")
    if not module:  # x_pad_token, cap_pad_token, siglip_pad_token
        return (leaf,)
    patched = _PATCHED.match(module)
    if patched and patched[2] == str(patch_size):
        module = patched[1] + module[patched.end():]
    module = re.sub(r"(^|\.)adaLN_modulation\.[01]$", r"\1adaLN_modulation", module)
    module = rename_module(module, _RENAMES)
    if leaf == "weight":
        leaf = "scale" if "norm" in module.rpartition(".")[2] else "kernel"
    return path_from_dotted(module, leaf)


def to_ours(name: str, tensor: Any, *, patch_size: int) -> tuple[ParamPath, np.ndarray]:
    """One diffusers state-dict entry -> (our param path, float32 array in our layout)."""
    path, array = our_path(name, patch_size=patch_size), to_numpy(tensor)
    if path[-1] == "kernel":
        array = kernel_from_weight(name, array)
    return path, array


def diffusers_name(path: ParamPath, *, patch_size: int) -> str:
    """Our param path -> diffusers state-dict name (names only)."""
    *parts, leaf = (str(p) for p in path)
    if not parts:
        return leaf
    module = rename_module(".".join(parts), ((new, old) for old, new in _RENAMES))
    if parts[0] in ("x_embedder", "final_layer"):
        module = f"all_{parts[0]}.{patch_size}-1" + module[len(parts[0]):]
    if parts[-1] == "adaLN_modulation":  # Sequential(SiLU, Linear) in the final layer
        module += ".1" if parts[0] == "final_layer" else ".0"
    return f"{module}.{'weight' if leaf in ('kernel', 'scale') else leaf}"


def to_diffusers(path: ParamPath, array: Any, *, patch_size: int) -> tuple[str, np.ndarray]:
    """One of our params -> (diffusers state-dict name, float32 array in diffusers' layout)."""
    name, array = diffusers_name(path, patch_size=patch_size), to_numpy(array)
    return name, (array.T if path[-1] == "kernel" else array)


def lora_names(config: ZImageConfig) -> LoraNames:
    """The key mapper for ``peft_lora.save_diffusers_lora`` / ``load_diffusers_lora``
    (``names=``): every Z-Image kernel is a diffusers Linear. A saved LoRA loads with
    ``ZImagePipeline.load_lora_weights`` (which reads alpha from the file's metadata;
    ``load_lora_adapter(file)`` alone does not, so pass it ``metadata=`` from
    ``ZImagePipeline.lora_state_dict(file, return_lora_metadata=True)``)."""
    p = config.patch_size
    return LoraNames(functools.partial(diffusers_name, patch_size=p),
                     functools.partial(our_path, patch_size=p),
                     lambda path: path[-1] == "kernel")


# --------------------------------------------------------------------------- conversion


@functools.lru_cache(maxsize=4)
def _shapes(config: ZImageConfig) -> tuple[tuple[ParamPath, tuple[int, ...]], ...]:
    return tuple(param_shapes(lambda rngs: ZImage(config, rngs=rngs)).items())


def _expected(config: ZImageConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Every parameter's path and shape (built abstractly once per config)."""
    return dict(_shapes(config))


def convert_state_dict(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    config: ZImageConfig,
    what: str = f"diffusers {CLASS_NAME} state dict",
) -> dict:
    """diffusers state dict (a mapping or ``(name, tensor)`` pairs; numpy or torch tensors) ->
    our params (nested dict of float32 numpy, unscanned layers).

    Raises ``ValueError`` naming every missing, unexpected or mis-shaped key.
    """
    if config.scan_layers:
        raise ValueError("convert_state_dict returns per-layer params; pass the config with "
                         "scan_layers=False and stack with zimage.stack_layers.")
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    p = config.patch_size
    return assemble(items, functools.partial(our_path, patch_size=p),
                    functools.partial(to_ours, patch_size=p),
                    functools.partial(to_diffusers, patch_size=p), _expected(config), what, _FIX)


def load_diffusers_transformer(directory: str | os.PathLike) -> tuple[ZImageConfig, dict]:
    """Read a diffusers Z-Image transformer folder (``config.json`` plus
    ``diffusion_pytorch_model.safetensors`` or its sharded ``.index.json``; any float dtype,
    bfloat16 included), one shard and one tensor at a time; never imports torch.

    Returns ``(config, params)``; apply with ``nnx.replace_by_pure_dict(nnx.state(model),
    params)`` on ``ZImage(config, ...)``.
    """
    config = config_from_diffusers(read_config(directory))
    params = convert_state_dict(iter_safetensors(directory, WEIGHTS_STEM), config,
                                what=f"checkpoint {directory}")
    return config, params


def save_diffusers_transformer(config: ZImageConfig, params: Mapping,
                               directory: str | os.PathLike) -> None:
    """Write a folder that ``ZImageTransformer2DModel.from_pretrained(directory)`` loads
    (``config.json`` and one float32 ``diffusion_pytorch_model.safetensors``).

    ``params`` is our nested dict of unscanned layers (``zimage.unstack_layers`` first if
    scanned)."""
    flat = {path: to_numpy(leaf) for path, leaf in flatten(params).items()}
    expected = _expected(config if not config.scan_layers
                         else ZImageConfig(**{**config.__dict__, "scan_layers": False}))

    def show(path: ParamPath) -> str:
        return "/".join(map(str, path))

    raise_on_mismatch(
        "params",
        missing=[show(p) for p in expected if p not in flat],
        unexpected=[show(p) for p in flat if p not in expected],
        misshaped=[f"{show(p)}: shape {a.shape}, expected {expected[p]}"
                   for p, a in flat.items() if p in expected and a.shape != expected[p]],
        fix="Fix: pass the unscanned params of ZImage(config) for this same config.",
    )
    tensors = {}
    for path, array in flat.items():
        name, weight = to_diffusers(path, array, patch_size=config.patch_size)
        tensors[name] = np.ascontiguousarray(weight)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_diffusers(config), indent=2))
    save_file(tensors, str(directory / f"{WEIGHTS_STEM}.safetensors"), metadata={"format": "pt"})

"""diffusers ``SD3Transformer2DModel`` <-> our ``MMDiT`` (SD3 and SD3.5 / MMDiT-X).

One key mapper (``to_ours`` / ``to_diffusers``) serves the loader, the state-dict converter
and the exporter. Module names already mirror diffusers, so the mapping is:

* Linear ``weight`` ``[out, in]`` <-> ``kernel`` ``[in, out]`` (transposed); qk RMSNorm
  ``weight`` <-> ``scale``; ``bias`` unchanged.
* ``pos_embed.proj``: diffusers' Conv2d weight ``[D, C, p, p]`` <-> our Linear kernel over
  patches flattened as ``(patch_row, patch_col, channel)``: ``transpose(2, 3, 1, 0)`` then
  ``reshape(p * p * C, D)``.
* ``attn.to_out.0`` <-> ``attn.to_out``, ``ff.net.0.proj`` <-> ``ff.fc1``, ``ff.net.2`` <->
  ``ff.fc2`` (also for ``attn2`` and ``ff_context``); ``transformer_blocks.<i>`` <->
  ``("transformer_blocks", i)``.
* ``pos_embed.pos_embed``: diffusers' fixed sincos buffer ``[1, M * M, D]``; we compute it.
  It is optional on load (checked against ours when present) and written on export.
* ``source_embed`` (our edit conditioning) has no diffusers counterpart: zeros on load, which
  leaves text-to-image outputs unchanged, unless the folder holds ``source_embed.npy`` (written
  beside the weights by our exporter, jobs/export.py, for an edit-trained model); dropped
  from the weights on export.

Running our model like diffusers': ``z`` is channels-last ``[B, H, W, C]`` (diffusers
``[B, C, H, W]``), ``sigma`` in [0, 1] is diffusers' ``timestep / 1000``, and ``cond`` is
``{"text": encoder_hidden_states, "text_mask": all True, "pooled": pooled_projections}``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Iterator, Mapping
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
from danceopd_jax.models.mmdit import MMDiT, MMDiTConfig, _sincos_grid

CLASS_NAME = "SD3Transformer2DModel"
WEIGHTS_STEM = "diffusion_pytorch_model"
SOURCE_EMBED_FILE = "source_embed.npy"  # our edit conditioning, beside an exported transformer
# MMDiTConfig fields that diffusers' config.json carries under the same names (and defaults);
# dtype, remat and attention are ours only (set them with dataclasses.replace after loading).
_DIFFUSERS_FIELDS = (
    "sample_size", "patch_size", "in_channels", "out_channels", "num_layers",
    "attention_head_dim", "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
    "pooled_projection_dim", "pos_embed_max_size", "dual_attention_layers", "qk_norm",
)
# Ours, written into config.json only when set: diffusers' class has no coarse tokens, so it
# warns that it ignores the field (and then computes another function); our loader and
# examples/torch_edit_sd3.py read it.
_COARSE_FIELD = "coarse_scale"
_POS_EMBED_BUFFER = "pos_embed.pos_embed"
_PATCH_WEIGHT = "pos_embed.proj.weight"
_SOURCE_EMBED: ParamPath = ("source_embed",)
# (diffusers module suffix, ours)
_RENAMES = (("to_out.0", "to_out"), ("net.0.proj", "fc1"), ("net.2", "fc2"))
_FIX = (
    "Fix: use the config.json that belongs to these weights (num_layers, dual_attention_layers, "
    "qk_norm and the widths must match) and a diffusers SD3Transformer2DModel folder "
    "(e.g. <pipeline>/transformer)."
)


# --------------------------------------------------------------------------- config


def config_from_diffusers(config: Mapping[str, Any]) -> MMDiTConfig:
    """diffusers ``config.json`` dict -> ``MMDiTConfig`` (absent fields take diffusers' defaults,
    which are ours; ``out_channels: null`` means ``in_channels`` as in diffusers)."""
    known = (*_DIFFUSERS_FIELDS, _COARSE_FIELD)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(
            f"diffusers transformer config has unsupported fields {unknown}; only "
            f"{CLASS_NAME} configs with fields {_DIFFUSERS_FIELDS} can be converted."
        )
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise ValueError(f"config is for {name!r}, not {CLASS_NAME!r}; pass an SD3 transformer.")
    fields = {k: v for k, v in config.items() if k in known}
    if "out_channels" in fields and fields["out_channels"] is None:
        fields["out_channels"] = fields.get("in_channels", MMDiTConfig.in_channels)
    if "dual_attention_layers" in fields:
        fields["dual_attention_layers"] = tuple(fields["dual_attention_layers"])
    return MMDiTConfig(**fields)


def config_to_diffusers(config: MMDiTConfig) -> dict[str, Any]:
    """``MMDiTConfig`` -> diffusers ``config.json`` dict (our-only fields are dropped, but
    ``coarse_scale`` when set: without it these weights compute another function)."""
    fields = {k: getattr(config, k) for k in _DIFFUSERS_FIELDS}
    fields["dual_attention_layers"] = list(config.dual_attention_layers)
    if config.coarse_scale:
        fields[_COARSE_FIELD] = config.coarse_scale
    return {"_class_name": CLASS_NAME, **fields}


# --------------------------------------------------------------------------- key mapper


def our_path(name: str) -> ParamPath:
    """diffusers state-dict name -> our param path (names only)."""
    module, _, leaf = name.rpartition(".")
    module = rename_module(module, _RENAMES)
    if leaf == "weight":  # qk RMSNorms are the only norms with weights
        leaf = "scale" if module.rpartition(".")[2].startswith("norm_") else "kernel"
    return path_from_dotted(module, leaf)


def to_ours(name: str, tensor: Any) -> tuple[ParamPath, np.ndarray]:
    """One diffusers state-dict entry -> (our param path, float32 array in our layout)."""
    path, array = our_path(name), to_numpy(tensor)
    if path[-1] != "kernel":
        return path, array
    if name != _PATCH_WEIGHT:
        return path, kernel_from_weight(name, array)
    if array.ndim != 4:
        raise ValueError(
            f"{name}: the patch Conv2d weight must be 4-D [D, C, p, p], got shape {array.shape}"
        )
    return path, array.transpose(2, 3, 1, 0).reshape(-1, array.shape[0])


def diffusers_name(path: ParamPath) -> str:
    """Our param path -> diffusers state-dict name (names only)."""
    *module_parts, leaf = (str(p) for p in path)
    module = rename_module(".".join(module_parts), ((new, old) for old, new in _RENAMES))
    return f"{module}.{'weight' if leaf in ('kernel', 'scale') else leaf}"


def to_diffusers(path: ParamPath, array: Any, *, patch_size: int) -> tuple[str, np.ndarray]:
    """One of our params -> (diffusers state-dict name, float32 array in diffusers' layout).

    ``patch_size`` is needed to fold the patch kernel back into a Conv2d weight.
    """
    name, array = diffusers_name(path), to_numpy(array)
    if path[-1] != "kernel":
        return name, array
    if name != _PATCH_WEIGHT:
        return name, array.T
    p = patch_size
    return name, array.reshape(p, p, -1, array.shape[-1]).transpose(3, 2, 0, 1)


# --------------------------------------------------------------------------- conversion


def _pos_embed_buffer(config: MMDiTConfig) -> np.ndarray:
    """diffusers' ``pos_embed.pos_embed`` buffer ``[1, M * M, D]`` from our sincos grid."""
    m, d = config.pos_embed_max_size, config.inner_dim
    grid = _sincos_grid(d, m, config.sample_size // config.patch_size)
    return grid.reshape(1, m * m, d)


def _check_pos_embed(
    tensors: Iterable[tuple[str, Any]], config: MMDiTConfig
) -> Iterator[tuple[str, Any]]:
    """Pass tensors through, verifying (and dropping) the optional sincos buffer."""
    for name, tensor in tensors:
        if name != _POS_EMBED_BUFFER:
            yield name, tensor
            continue
        buffer, ours = to_numpy(tensor), _pos_embed_buffer(config)
        # bfloat16 checkpoints round the table by up to 4e-3; a wrong config moves it by ~1.
        if buffer.shape != ours.shape or not np.allclose(buffer, ours, rtol=0, atol=1e-2):
            raise ValueError(
                f"{name} (shape {buffer.shape}) differs from the sincos table {ours.shape} that "
                "config's sample_size, patch_size and pos_embed_max_size imply; use the "
                "config.json that belongs to these weights."
            )


def _expected(config: MMDiTConfig) -> dict[ParamPath, tuple[int, ...]]:
    return param_shapes(lambda rngs: MMDiT(config, rngs=rngs))


def convert_state_dict(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    config: MMDiTConfig,
    what: str = f"diffusers {CLASS_NAME} state dict",
) -> dict:
    """diffusers state dict (a mapping or ``(name, tensor)`` pairs; numpy or torch tensors) ->
    our params (nested dict of float32 numpy; ``source_embed`` zeros).

    Raises ``ValueError`` naming every missing, unexpected or mis-shaped key.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    expected = _expected(config)
    source_shape = expected.pop(_SOURCE_EMBED)
    params = assemble(
        _check_pos_embed(items, config),
        our_path,
        to_ours,
        functools.partial(to_diffusers, patch_size=config.patch_size),
        expected,
        what,
        _FIX,
    )
    params["source_embed"] = np.zeros(source_shape, np.float32)
    return params


def load_diffusers_transformer(directory: str | os.PathLike) -> tuple[MMDiTConfig, dict]:
    """Read a diffusers transformer folder (``config.json`` plus
    ``diffusion_pytorch_model.safetensors`` or its sharded ``.index.json``), streaming one
    shard and one tensor at a time; never imports torch.

    Returns ``(config, params)``; apply with ``nnx.replace_by_pure_dict(nnx.state(model),
    params)`` on ``MMDiT(config, ...)``. ``source_embed`` is read from the folder's
    ``source_embed.npy`` if there is one, else zeros; ``coarse_scale`` from ``config.json``
    (ours; 0 when absent).
    """
    config = config_from_diffusers(read_config(directory))
    params = convert_state_dict(
        iter_safetensors(directory, WEIGHTS_STEM), config, what=f"checkpoint {directory}"
    )
    source = Path(directory) / SOURCE_EMBED_FILE
    if source.is_file():
        embed = np.load(source).astype(np.float32)
        if embed.shape != params["source_embed"].shape:
            raise ValueError(f"{source} has shape {embed.shape}, but this transformer's source "
                             f"embedding is {params['source_embed'].shape}; it belongs to "
                             "another export, remove or replace it.")
        params["source_embed"] = embed
    return config, params


def save_diffusers_transformer(
    config: MMDiTConfig,
    params: Mapping,
    directory: str | os.PathLike,
    *,
    drop_source_embed: bool = False,
) -> None:
    """Write a folder that ``SD3Transformer2DModel.from_pretrained(directory)`` loads
    (``config.json`` and one float32 ``diffusion_pytorch_model.safetensors``).

    ``params`` is our nested dict (``nnx.to_pure_dict(nnx.state(model))``). ``source_embed`` is
    not exportable: diffusers has no edit conditioning, so it is dropped. A non-zero one
    (a model trained for edits) raises unless ``drop_source_embed=True``.

    A model with coarse tokens (``config.coarse_scale``) is written with ``coarse_scale`` in its
    ``config.json``. diffusers' class has none: it loads the folder with a warning that it
    ignores the field and computes another function. ``load_diffusers_transformer`` and
    examples/torch_edit_sd3.py run it as trained.
    """
    flat = {path: to_numpy(leaf) for path, leaf in flatten(params).items()}
    source = flat.pop(_SOURCE_EMBED, None)
    if source is not None and np.any(source) and not drop_source_embed:
        raise ValueError(
            "params['source_embed'] is non-zero (trained edit conditioning) and diffusers' "
            f"{CLASS_NAME} has no counterpart; pass drop_source_embed=True to export the "
            "text-to-image model without it."
        )
    expected = _expected(config)
    expected.pop(_SOURCE_EMBED)

    def show(path: ParamPath) -> str:
        return "/".join(map(str, path))

    raise_on_mismatch(
        "params",
        missing=[show(p) for p in expected if p not in flat],
        unexpected=[show(p) for p in flat if p not in expected],
        misshaped=[
            f"{show(p)}: shape {a.shape}, expected {expected[p]}"
            for p, a in flat.items() if p in expected and a.shape != expected[p]
        ],
        fix="Fix: pass the params of MMDiT(config) for this same config.",
    )
    tensors = {_POS_EMBED_BUFFER: _pos_embed_buffer(config)}
    for path, array in flat.items():
        name, weight = to_diffusers(path, array, patch_size=config.patch_size)
        tensors[name] = np.ascontiguousarray(weight)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_diffusers(config), indent=2))
    save_file(tensors, str(directory / f"{WEIGHTS_STEM}.safetensors"), metadata={"format": "pt"})

"""diffusers / PEFT LoRA of an ``SD3Transformer2DModel`` (or, with ``names=``, another
backbone's, e.g. ``diffusers_zimage.lora_names``) <-> our functional LoRA tree.

Ours (``danceopd_jax.models.lora``): a tree mirroring the base params whose adapted kernels
``[in, out]`` are replaced by ``{"a": [in, rank], "b": [rank, out]}``, merged as
``kernel + (alpha / rank) * a @ b``. diffusers / PEFT: per Linear module ``<module>.lora_A.weight``
``[rank, in]`` and ``<module>.lora_B.weight`` ``[out, rank]``, merged as
``weight + (lora_alpha / rank) * B @ A``; so ``A = a.T``, ``B = b.T`` and the module names are
those of the one key mapper in ``diffusers_sd3``.

Where alpha comes from on load, per module: a ``<module>.alpha`` entry (kohya / older diffusers),
else ``network_alpha``, else the ``lora_alpha`` (and ``alpha_pattern``) of the file's PEFT config
(diffusers' ``lora_adapter_metadata``, or a PEFT folder's ``adapter_config.json``), else the
rank (the PEFT convention without alphas: scale 1). Our tree has one alpha; modules whose alpha
differs from the most common one get the ratio folded into their ``b``.

A teacher is then ``lora.merge(base, tree, alpha)``: functional, the base is never copied.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from danceopd_jax.interop._common import (
    ParamPath,
    flatten,
    iter_safetensors,
    raise_on_mismatch,
    to_numpy,
    unflatten,
)
from danceopd_jax.interop.diffusers_sd3 import _PATCH_WEIGHT, diffusers_name, our_path

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # what load_lora_weights(dir) looks for
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (a PEFT config)
_PREFIX = "transformer"
# Optional prefix (diffusers pipeline file / PEFT model), the module, then the entry.
_KEY = re.compile(
    r"^(?:transformer\.|base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|alpha)$"
)
_FIX = (
    "Fix: pass an SD3 transformer LoRA in the diffusers / PEFT format (keys "
    "'[transformer.]<module>.lora_A.weight' [rank, in] and '.lora_B.weight' [out, rank] for "
    "Linear modules of this base model, optional '.alpha'), made for this base's config; "
    "text-encoder LoRA and Conv2d (pos_embed.proj) LoRA are not supported."
)


@dataclass(frozen=True)
class LoraNames:
    """A backbone's key mapper as LoRA conversion needs it: our path <-> diffusers name, and
    which kernels are diffusers Linears (the ones a diffusers LoRA can adapt)."""

    diffusers_name: Callable[[ParamPath], str]
    our_path: Callable[[str], ParamPath]
    is_linear: Callable[[ParamPath], bool]

    def module(self, path: ParamPath) -> str:
        """Our kernel path -> the diffusers module name, e.g. ``transformer_blocks.0.attn
        .to_out.0``."""
        return self.diffusers_name(path).removesuffix(".weight")


# SD3's patch projection is a Linear for us but a Conv2d in diffusers.
SD3_NAMES = LoraNames(diffusers_name, our_path,
                      lambda path: path[-1] == "kernel" and diffusers_name(path) != _PATCH_WEIGHT)


def _adaptable(base_params: Mapping, names: LoraNames) -> dict[ParamPath, tuple[int, int]]:
    """Shapes of the base kernels a diffusers LoRA can adapt."""
    return {path: tuple(leaf.shape) for path, leaf in flatten(base_params).items()
            if names.is_linear(path) and len(leaf.shape) == 2}


def _read(
    source: str | os.PathLike | Mapping[str, Any],
) -> tuple[Iterable[tuple[str, Any]], dict[str, Any], str]:
    """(tensors, PEFT config (may be empty), description) of a file, a folder or a state dict."""
    if isinstance(source, Mapping):
        return source.items(), {}, "LoRA state dict"
    path = Path(source)
    config: dict[str, Any] = {}
    if path.is_dir():
        if (path / DIFFUSERS_WEIGHTS).is_file():
            path = path / DIFFUSERS_WEIGHTS
        elif (path / PEFT_WEIGHTS).is_file():
            if (path / PEFT_CONFIG).is_file():
                config = json.loads((path / PEFT_CONFIG).read_text())
            path = path / PEFT_WEIGHTS
        else:
            raise FileNotFoundError(
                f"{source} holds neither {DIFFUSERS_WEIGHTS} nor {PEFT_WEIGHTS}; pass the LoRA "
                ".safetensors file or the folder that holds it."
            )
    elif not path.is_file() or path.suffix != ".safetensors":
        raise FileNotFoundError(f"{source} is not a LoRA file; pass a .safetensors file (or "
                                "its folder).")
    with safe_open(path, framework="numpy") as f:
        raw = (f.metadata() or {}).get(_METADATA_KEY)
    if raw:  # diffusers' keys are prefixed with the pipeline component
        config = {k.removeprefix(f"{_PREFIX}."): v for k, v in json.loads(raw).items()
                  if k.startswith(f"{_PREFIX}.")}
    stem = path.name.removesuffix(".safetensors")
    return iter_safetensors(path.parent, stem), config, f"LoRA {path}"


def _alpha(
    entry: np.ndarray | None,
    network_alpha: float | None,
    config: Mapping[str, Any],
    module: str,
    rank: int,
) -> float:
    """A module's alpha: its ``.alpha`` entry, else ``network_alpha``, else its PEFT config's
    ``alpha_pattern`` entry (PEFT's matching rule) or ``lora_alpha``, else its rank."""
    if entry is not None:
        return float(entry.reshape(()))
    if network_alpha is not None:
        return float(network_alpha)
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config.get("lora_alpha") or rank)


def load_diffusers_lora(
    source: str | os.PathLike | Mapping[str, Any],
    base_params: Mapping,
    *,
    network_alpha: float | None = None,
    names: LoraNames = SD3_NAMES,
) -> tuple[dict, float]:
    """Read an SD3 transformer LoRA (a ``.safetensors`` file, a folder holding diffusers'
    ``pytorch_lora_weights.safetensors`` or PEFT's ``adapter_model.safetensors``, or a state dict
    of numpy / torch tensors) into ``(tree, alpha)`` for ``lora.merge(base_params, tree, alpha)``.

    Keys may carry diffusers' ``transformer.`` or PEFT's ``base_model.model.`` prefix, or none.
    ``network_alpha`` (one alpha for every module) is for state dicts and files without alphas.
    Raises ``ValueError`` naming every key that maps to no Linear kernel of ``base_params``,
    every ``lora_A`` without its ``lora_B`` (or vice versa) and every rank or shape mismatch.
    """
    tensors, config, what = _read(source)
    if config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{what} is a DoRA / rsLoRA adapter; only plain LoRA is supported.")
    if network_alpha is not None and config.get("lora_alpha") is not None:
        raise ValueError(
            f"network_alpha={network_alpha} was passed but {what} carries lora_alpha="
            f"{config['lora_alpha']}; drop network_alpha."
        )
    kernels = _adaptable(base_params, names)
    parts: dict[ParamPath, dict[str, np.ndarray]] = collections.defaultdict(dict)
    unexpected: list[str] = []
    for name, tensor in tensors:
        match = _KEY.match(name)
        if match is None:
            unexpected.append(f"{name}: not a LoRA entry (lora_A.weight, lora_B.weight, alpha)")
            continue
        path = names.our_path(f"{match['module']}.weight")
        if path not in kernels:
            unexpected.append(f"{name}: {match['module']!r} is not a Linear of the base model")
            continue
        parts[path][match["part"]] = to_numpy(tensor)

    missing: list[str] = []
    misshaped: list[str] = []
    factors: dict[ParamPath, tuple[np.ndarray, np.ndarray]] = {}
    alphas: dict[ParamPath, float] = {}
    for path, entry in parts.items():
        module = names.module(path)
        lack = sorted({"lora_A.weight", "lora_B.weight"} - set(entry))
        if lack:
            missing += [f"{module}.{p} (other entries of {module} are present)" for p in lack]
            continue
        a, b = entry["lora_A.weight"], entry["lora_B.weight"]
        fan_in, fan_out = kernels[path]
        if a.ndim != 2 or b.ndim != 2:
            misshaped.append(f"{module}: lora_A {a.shape}, lora_B {b.shape}; both must be 2-D")
        elif a.shape[0] != b.shape[1]:
            misshaped.append(f"{module}: rank mismatch, lora_A {a.shape} has rank {a.shape[0]} "
                             f"but lora_B {b.shape} has rank {b.shape[1]}")
        elif a.shape[1] != fan_in or b.shape[0] != fan_out:
            misshaped.append(f"{module}: lora_A {a.shape}, lora_B {b.shape}; expected "
                             f"[rank, {fan_in}] and [{fan_out}, rank]")
        else:
            factors[path] = (a, b)
            alphas[path] = _alpha(entry.get("alpha"), network_alpha, config, module, a.shape[0])
    raise_on_mismatch(what, missing, unexpected, misshaped, _FIX)
    if not factors:
        raise ValueError(f"{what} holds no LoRA factors. {_FIX}")

    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    flat: dict[ParamPath, np.ndarray] = {}
    for path, (a, b) in factors.items():
        flat[(*path, "a")] = np.ascontiguousarray(a.T)
        flat[(*path, "b")] = np.ascontiguousarray(b.T * np.float32(alphas[path] / alpha))
    return unflatten(flat), alpha


def save_diffusers_lora(lora_tree: Mapping, alpha: float, path: str | os.PathLike, *,
                       names: LoraNames = SD3_NAMES) -> Path:
    """Write ``(lora_tree, alpha)`` as a diffusers LoRA that ``StableDiffusion3Pipeline.
    load_lora_weights(path)`` loads (or ``SD3Transformer2DModel.load_lora_adapter(file,
    prefix="transformer")`` with the file returned): float32
    ``transformer.<module>.lora_A/B.weight`` plus the PEFT config (rank, alpha, targets) as
    diffusers' safetensors metadata.

    ``path`` is a ``.safetensors`` file or a folder (which gets ``pytorch_lora_weights
    .safetensors``). Returns the file written.
    """
    flat = flatten(lora_tree)
    kernels = sorted({p[:-1] for p in flat}, key=str)
    bad = [p for p in kernels if not names.is_linear(p) or {(*p, "a"), (*p, "b")} - flat.keys()]
    bad += [p for p in flat if p[-1] not in ("a", "b")]
    if bad:
        raise ValueError(
            f"lora_tree entries {['/'.join(map(str, p)) for p in bad]} are not "
            "{'a': [in, rank], 'b': [rank, out]} of a Linear kernel (diffusers' pos_embed.proj "
            "is a Conv2d); pass a tree from lora.init_lora or load_diffusers_lora."
        )
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for kernel in kernels:
        a, b = to_numpy(flat[(*kernel, "a")]), to_numpy(flat[(*kernel, "b")])
        module = names.module(kernel)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"{module}: a {a.shape} and b {b.shape} must be [in, rank] and "
                             "[rank, out] with the same rank.")
        tensors[f"{_PREFIX}.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{_PREFIX}.{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
        ranks[module] = a.shape[1]
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    config = {
        "r": rank, "lora_alpha": float(alpha), "target_modules": sorted(ranks),
        # PEFT matches these keys as regexes against module names
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
    }
    metadata = json.dumps({f"{_PREFIX}.{k}": v for k, v in config.items()}, sort_keys=True)
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / DIFFUSERS_WEIGHTS
    save_file(tensors, str(path), metadata={"format": "pt", _METADATA_KEY: metadata})
    return path

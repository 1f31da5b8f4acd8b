"""The PyTorch side of every backbone family (models/backbones.py): its diffusers module, with
the same names in each (CLASS_NAME, config_from_diffusers, config_to_diffusers,
load_diffusers_transformer, save_diffusers_transformer, the key mapper)."""

from __future__ import annotations

from types import ModuleType

from danceopd_jax.interop import diffusers_sd3, diffusers_zimage

TRANSFORMERS: dict[str, ModuleType] = {"mmdit": diffusers_sd3, "zimage": diffusers_zimage}


def transformer_io(family: str) -> ModuleType:
    """The diffusers module of backbone family `family` (a models/backbones.py name)."""
    if family not in TRANSFORMERS:
        raise KeyError(f"backbone family {family!r} has no diffusers converter; known: "
                       f"{sorted(TRANSFORMERS)} (interop/backbones.py).")
    return TRANSFORMERS[family]

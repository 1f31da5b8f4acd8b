"""The PyTorch side of every backbone family (models/backbones.py): its diffusers module, with
the same names in each (CLASS_NAME, config_from_diffusers, config_to_diffusers,
load_diffusers_transformer, save_diffusers_transformer, the key mapper), its LoRA names and
the conditions the prepare command computes for it."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from danceopd_jax.interop import diffusers_sd3, diffusers_zimage
from danceopd_jax.interop.peft_lora import SD3_NAMES, LoraNames
from danceopd_jax.interop.transformers_text import SD3PromptEncoder
from danceopd_jax.interop.zimage_conditions import ZImageConditions

TRANSFORMERS: dict[str, ModuleType] = {"mmdit": diffusers_sd3, "zimage": diffusers_zimage}
_LORA_NAMES: dict[str, Callable[[Any], LoraNames]] = {
    "mmdit": lambda config: SD3_NAMES, "zimage": diffusers_zimage.lora_names}
# family -> (its conditions from a diffusers pipeline folder (pipeline, max_sequence_length,
# batch_size), the pipeline's default max_sequence_length: SD3's T5 tokens, Z-Image's Qwen3's).
_CONDITIONS: dict[str, tuple[Callable[..., Any], int]] = {
    "mmdit": (SD3PromptEncoder, 256), "zimage": (ZImageConditions, 512)}


def _known(family: str, table: Mapping[str, Any], what: str) -> None:
    if family not in table:
        raise KeyError(f"backbone family {family!r} has no {what}; known: {sorted(table)} "
                       "(interop/backbones.py).")


def transformer_io(family: str) -> ModuleType:
    """The diffusers module of backbone family `family` (a models/backbones.py name)."""
    _known(family, TRANSFORMERS, "diffusers converter")
    return TRANSFORMERS[family]


def checkpoint_family(config: Mapping[str, Any], where: str | os.PathLike) -> str:
    """The family of a diffusers transformer from its config.json (its ``_class_name``)."""
    name = config.get("_class_name")
    for family, io in TRANSFORMERS.items():
        if io.CLASS_NAME == name:
            return family
    known = {io.CLASS_NAME: family for family, io in TRANSFORMERS.items()}
    raise ValueError(f"{where}: config.json's _class_name is {name!r}, which no backbone family "
                     f"converts (known: {known}); pass a diffusers transformer folder of one.")


def lora_names(family: str, config: Any) -> LoraNames:
    """The key mapper of `family`'s diffusers LoRA files (peft_lora ``names=``)."""
    _known(family, _LORA_NAMES, "LoRA names")
    return _LORA_NAMES[family](config)


def condition_encoder(family: str, pipeline: str | os.PathLike, max_sequence_length: int,
                      batch_size: int = 16) -> Any:
    """What the prepare command stores per row for `family`, from a diffusers pipeline folder:
    SD3's text encoders (prompts -> (text, pooled)) or Z-Image's ZImageConditions (a
    data/conditions.py ConditionEncoder)."""
    _known(family, _CONDITIONS, "prepared conditions")
    return _CONDITIONS[family][0](pipeline, max_sequence_length, batch_size)


def default_sequence_length(family: str) -> int:
    """The text tokens `family`'s pipeline encodes by default."""
    _known(family, _CONDITIONS, "prepared conditions")
    return _CONDITIONS[family][1]

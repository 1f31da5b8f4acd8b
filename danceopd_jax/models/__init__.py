"""Flax NNX modules: the MMDiT backbone family, text encoders and functional LoRA."""

from danceopd_jax.models.lora import DEFAULT_TARGETS, init_lora, merge
from danceopd_jax.models.mmdit import MMDiT, MMDiTConfig, param_count, tiny_config

__all__ = [
    "DEFAULT_TARGETS",
    "MMDiT",
    "MMDiTConfig",
    "init_lora",
    "merge",
    "param_count",
    "tiny_config",
]

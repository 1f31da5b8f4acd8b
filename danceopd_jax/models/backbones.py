"""Every backbone family (models/contract.py), and the family of a config."""

from __future__ import annotations

from typing import Any

from danceopd_jax.models import mmdit, zimage
from danceopd_jax.models.contract import Backbone

BACKBONES: dict[str, Backbone] = {b.name: b for b in (mmdit.BACKBONE, zimage.BACKBONE)}
DEFAULT_FAMILY = mmdit.BACKBONE.name  # what a command assumes when it is not told the family


def backbone_of(config: Any) -> Backbone:
    """The family whose config type `config` is."""
    for backbone in BACKBONES.values():
        if isinstance(config, backbone.config_type):
            return backbone
    raise TypeError(f"{type(config).__name__} is no backbone family's config; the families are "
                    f"{sorted(BACKBONES)} (models/backbones.py).")


def reference(name: str) -> tuple[Backbone, Any, int]:
    """(family, config factory, non-image tokens) of a real model named in some family's
    references, e.g. "SD3.5-Medium"."""
    for backbone in BACKBONES.values():
        if name in backbone.references:
            return backbone, *backbone.references[name]
    known = sorted(n for b in BACKBONES.values() for n in b.references)
    raise KeyError(f"no backbone family has a reference model {name!r}; known: {known}.")

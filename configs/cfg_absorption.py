"""CFG absorption: the anchor with guidance alpha=3.5 as teacher, a single-pass student."""

from danceopd_jax.config import base_config, route


def get_config():
    c = base_config()
    c.routes.t2i = route("anchor", "t2i", 1.0, cfg_alpha=3.5)
    return c

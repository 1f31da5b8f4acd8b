"""diffusers' ``AutoencoderKL`` in PyTorch: images -> SD3 latents for the prepare command.

Only the prepare command imports this module (lazily); the JAX training path never does. The
latent of an image is the mean of the encoder's posterior (deterministic: a source image gets
one latent however often it is prepared), shifted and scaled as SD3's pipeline does:
``(mean - shift_factor) * scaling_factor`` with both factors from the VAE's config.json.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import AutoencoderKL


class VAEEncoder:
    """uint8 images [n, H, W, 3] -> float32 latents [n, H/f, W/f, C] (channels-last)."""

    def __init__(self, directory: str | os.PathLike, batch_size: int = 8):
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise FileNotFoundError(f"{directory} has no config.json; pass a diffusers "
                                    "AutoencoderKL folder (e.g. <pipeline>/vae).")
        self.vae = AutoencoderKL.from_pretrained(directory).eval()
        config = self.vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.shift_factor or 0.0)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size]))
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            mean = self.vae.encode(x).latent_dist.mode()
            latents = (mean - self.shift_factor) * self.scaling_factor
            out.append(latents.permute(0, 2, 3, 1).float().numpy())
        return np.concatenate(out)

"""Image-side and Z-Image encoders against the PyTorch originals (tiny random models, nothing
downloaded): the Flax AutoencoderKL decoder against diffusers' decode as the SD3 and Z-Image
pipelines call it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import randomize, with_params

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from flax import nnx  # noqa: E402

from danceopd_jax.interop import diffusers_vae  # noqa: E402
from danceopd_jax.interop._common import flatten  # noqa: E402
from danceopd_jax.models.vae import VAEDecoder, to_uint8  # noqa: E402

TOL = 1e-4
# SD3-like (4 latent channels here, post-quant conv, a shift) and Z-Image-like (16 channels, no
# post-quant conv, Flux's factors); widths differ per block so that shortcuts are exercised.
VAE_VARIANTS = {
    "sd3": {"latent_channels": 4, "use_post_quant_conv": True, "scaling_factor": 1.5305,
            "shift_factor": 0.0609, "layers_per_block": 1},
    "zimage": {"latent_channels": 16, "use_post_quant_conv": False, "scaling_factor": 0.3611,
               "shift_factor": 0.1159, "layers_per_block": 2},
}


@pytest.fixture(scope="module", autouse=True)
def _exact_matmuls() -> Iterator[None]:
    with jax.default_matmul_precision("highest"):
        yield


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def _torch_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    blocks = (8, 16, 24)
    config = {"block_out_channels": blocks, "down_block_types": ["DownEncoderBlock2D"] * 3,
              "up_block_types": ["UpDecoderBlock2D"] * 3, "norm_num_groups": 4,
              "use_quant_conv": overrides.get("use_post_quant_conv", True), **overrides}
    return randomize(AutoencoderKL(**config), seed)


@pytest.mark.parametrize("variant", sorted(VAE_VARIANTS))
def test_vae_decoder_parity(variant: str, tmp_path: Path) -> None:
    """Our decoder, loaded from a saved folder without torch, against diffusers'
    ``vae.decode`` (raw) and the pipelines' ``vae.decode(z / scaling + shift)``."""
    vae = _torch_vae(**VAE_VARIANTS[variant])
    vae.save_pretrained(tmp_path / "vae")
    config, params = diffusers_vae.load_vae_decoder(tmp_path / "vae")
    assert (config.latent_channels, config.upsample) == (vae.config.latent_channels, 4)
    from_state_dict = diffusers_vae.convert_state_dict(vae.state_dict(), config)
    for path, leaf in flatten(from_state_dict).items():
        np.testing.assert_array_equal(flatten(params)[path], leaf, err_msg=str(path))
    decoder = with_params(lambda: VAEDecoder(config, rngs=nnx.Rngs(0)), params)

    z = np.random.default_rng(1).standard_normal((2, 3, 5, config.latent_channels))
    z = z.astype(np.float32)
    zt = torch.from_numpy(z).permute(0, 3, 1, 2)
    cfg = vae.config
    with torch.no_grad():
        raw = vae.decode(zt).sample.permute(0, 2, 3, 1).numpy()
        piped = vae.decode(zt / cfg.scaling_factor + cfg.shift_factor).sample
    piped = piped.permute(0, 2, 3, 1).numpy()
    ours_raw, ours = nnx.jit(lambda m, x: (m.decode(x), m(x)))(decoder, jnp.asarray(z))
    raw_err, err = _max_err(np.asarray(ours_raw), raw), _max_err(np.asarray(ours), piped)
    print(f"VAE decoder {variant}: decode {raw_err:.2e}, pipeline decode {err:.2e}")
    assert raw.shape == (2, 12, 20, 3) and raw_err <= TOL and err <= TOL
    assert np.abs(piped).max() > 0.5  # the outputs are not trivially small

    # diffusers' postprocess ("pil"): (x / 2 + 0.5).clamp(0, 1), then round(x * 255).
    from diffusers.image_processor import VaeImageProcessor

    pil = VaeImageProcessor().postprocess(torch.from_numpy(piped).permute(0, 3, 1, 2), "pil")
    theirs = np.stack([np.asarray(im) for im in pil])
    assert np.abs(to_uint8(ours).astype(int) - theirs).max() <= 1


def test_vae_converter_names_bad_keys_and_config() -> None:
    vae = _torch_vae(**VAE_VARIANTS["sd3"])
    config = diffusers_vae.config_from_diffusers(dict(vae.config))
    state_dict = dict(vae.state_dict())
    state_dict.pop("decoder.up_blocks.1.resnets.0.conv_shortcut.weight")
    state_dict["decoder.mid_block.attentions.0.query.weight"] = torch.zeros(24, 24)
    state_dict["decoder.conv_in.weight"] = torch.zeros(24, 4, 3)
    with pytest.raises(ValueError) as err:
        diffusers_vae.convert_state_dict(state_dict, config)
    message = str(err.value)
    assert "missing (1):\n    decoder.up_blocks.1.resnets.0.conv_shortcut.weight" in message
    assert "unexpected (1):\n    decoder.mid_block.attentions.0.query.weight" in message
    assert "decoder.conv_in.weight: shape (24, 4, 3), expected (24, 4, 3, 3)" in message
    assert "AutoencoderKL folder" in message
    with pytest.raises(ValueError, match="up_block_types="):
        diffusers_vae.config_from_diffusers({**vae.config, "up_block_types": ["X"] * 3})
    with pytest.raises(ValueError, match="_class_name='AutoencoderKLQwenImage'"):
        diffusers_vae.config_from_diffusers({"_class_name": "AutoencoderKLQwenImage"})


def test_loading_never_imports_torch(tmp_path: Path) -> None:
    _torch_vae(**VAE_VARIANTS["zimage"]).save_pretrained(tmp_path / "vae")
    script = (
        "import sys; sys.modules['torch'] = None  # any torch import now fails\n"
        "from danceopd_jax.interop import diffusers_vae\n"
        f"decode = diffusers_vae.ImageDecoder({str(tmp_path / 'vae')!r}, batch_size=2)\n"
        "import numpy as np\n"
        "images = decode(np.zeros((3, 2, 2, 16), np.float32))\n"
        "assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8, images.shape\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

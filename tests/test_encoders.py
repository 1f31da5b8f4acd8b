"""Image-side and Z-Image encoders against the PyTorch originals (tiny random models, nothing
downloaded): the Flax AutoencoderKL decoder against diffusers' decode as the SD3 and Z-Image
pipelines call it; the Flax Qwen3 against transformers and Z-Image's prompt features against
the ZImagePipeline's and ZImageOmniPipeline's encode_prompt (a tiny byte-level BPE tokenizer
with Qwen3's chat turn, built offline); the Flax SigLIP2 vision tower and the omni pipeline's
source-image features (prepare_siglip_embeds)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, load_module
from helpers import randomize, with_params

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from flax import nnx  # noqa: E402

from danceopd_jax.interop import (  # noqa: E402
    diffusers_vae,
    transformers_text,
    transformers_vision,
)
from danceopd_jax.interop._common import flatten  # noqa: E402
from danceopd_jax.models.text.qwen3 import Qwen3Model  # noqa: E402
from danceopd_jax.models.vae import VAEDecoder, to_uint8  # noqa: E402

TOL = 1e-4
# SD3-like (4 latent channels here, post-quant conv, a shift) and Z-Image-like (16 channels, no
# post-quant conv, Flux's factors); widths differ per block so that shortcuts are exercised.
VAE_VARIANTS = {
    "sd3": {"latent_channels": 4, "use_post_quant_conv": True, "scaling_factor": 1.5305,
            "shift_factor": 0.0609, "layers_per_block": 1, "block_out_channels": (8, 16, 24)},
    "zimage": {"latent_channels": 16, "use_post_quant_conv": False, "scaling_factor": 0.3611,
               "shift_factor": 0.1159, "layers_per_block": 2, "block_out_channels": (8, 16)},
}


@pytest.fixture(scope="module", autouse=True)
def _exact_matmuls() -> Iterator[None]:
    with jax.default_matmul_precision("highest"):
        yield


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def _torch_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    depth = len(overrides["block_out_channels"])
    config = {"down_block_types": ["DownEncoderBlock2D"] * depth,
              "up_block_types": ["UpDecoderBlock2D"] * depth, "norm_num_groups": 4,
              "use_quant_conv": overrides.get("use_post_quant_conv", True), **overrides}
    return randomize(AutoencoderKL(**config), seed)


@pytest.mark.parametrize("variant", sorted(VAE_VARIANTS))
def test_vae_decoder_parity(variant: str, tmp_path: Path) -> None:
    """Our decoder, loaded from a saved folder without torch, against diffusers'
    ``vae.decode`` (raw) and the pipelines' ``vae.decode(z / scaling + shift)``."""
    vae = _torch_vae(**VAE_VARIANTS[variant])
    vae.save_pretrained(tmp_path / "vae")
    config, params = diffusers_vae.load_vae_decoder(tmp_path / "vae")
    f = config.upsample
    assert f == 2 ** (len(vae.config.block_out_channels) - 1)
    assert config.latent_channels == vae.config.latent_channels
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
    assert raw.shape == (2, 3 * f, 5 * f, 3) and raw_err <= TOL and err <= TOL
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


# --------------------------------------------------------------------------- Qwen3

_E2E = load_module(ROOT / "launch" / "zimage_tiny_e2e.py")  # its tiny Qwen tokenizer
QWEN_VOCAB = _E2E.QWEN_VOCAB


def _tokenizer(path: Path):
    tok = _E2E.qwen_tokenizer()
    tok.save_pretrained(path)
    return tok


def _torch_qwen3(seed: int = 0):
    from transformers import Qwen3Config as HFQwen3Config
    from transformers import Qwen3Model as HFQwen3Model

    config = HFQwen3Config(vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=12, max_position_embeddings=64, rope_theta=1000.0,
                           rms_norm_eps=1e-6)
    return randomize(HFQwen3Model(config), seed)


def test_qwen3_parity(tmp_path: Path) -> None:
    model = _torch_qwen3()
    model.save_pretrained(tmp_path / "text_encoder")
    config, params = transformers_text.load_transformers_qwen3(tmp_path / "text_encoder")
    assert (config.head_dim, config.num_key_value_heads, config.rope_theta) == (12, 2, 1000.0)
    encoder = with_params(lambda: Qwen3Model(config, rngs=nnx.Rngs(0)), params)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, QWEN_VOCAB, (2, 11))
    mask = np.arange(11)[None] < np.array([[11], [6]])  # right padding, as Qwen's tokenizer
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    output_hidden_states=True)
    run = nnx.jit(lambda m, i, k: (m(i, k), m(i, k, output_hidden_layer=-2),
                                   m(i, k, output_hidden_layer=0)))
    last, penultimate, embeddings = run(encoder, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    keep = mask[..., None]  # padded positions' outputs are never used
    errors = [_max_err(np.asarray(ours) * keep, theirs.numpy() * keep) for ours, theirs in (
        (last, ref.last_hidden_state), (penultimate, ref.hidden_states[-2]),
        (embeddings, ref.hidden_states[0]))]
    print(f"Qwen3: last {errors[0]:.2e}, hidden_states[-2] {errors[1]:.2e}")
    assert max(errors) <= TOL


def test_qwen3_converter_names_bad_keys_and_config() -> None:
    model = _torch_qwen3()
    config = transformers_text.qwen3_config_from_transformers(model.config.to_dict())
    # A Qwen3ForCausalLM checkpoint: "model." prefix, lm_head skipped.
    causal = {f"model.{k}": v for k, v in model.state_dict().items()}
    causal["lm_head.weight"] = torch.zeros(QWEN_VOCAB, 32)
    params = transformers_text.convert_qwen3_state_dict(causal, config)
    np.testing.assert_array_equal(params["layers"][2]["self_attn"]["k_norm"]["scale"],
                                  model.layers[2].self_attn.k_norm.weight.detach().numpy())
    state_dict = dict(model.state_dict())
    state_dict.pop("layers.1.mlp.up_proj.weight")
    state_dict["layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 32)
    state_dict["layers.3.input_layernorm.weight"] = torch.ones(32)
    with pytest.raises(ValueError) as err:
        transformers_text.convert_qwen3_state_dict(state_dict, config)
    message = str(err.value)
    assert "missing (1):\n    layers.1.mlp.up_proj.weight" in message
    assert "unexpected (1):\n    layers.3.input_layernorm.weight" in message
    assert "layers.0.self_attn.k_proj.weight: shape (48, 32), expected (24, 32)" in message
    assert "Qwen3Model" in message
    with pytest.raises(ValueError, match="rope type 'yarn' is unsupported"):
        transformers_text.qwen3_config_from_transformers(
            {**model.config.to_dict(), "rope_parameters": {"rope_type": "yarn"}})


def test_zimage_prompt_features_match_the_pipelines(tmp_path: Path) -> None:
    """Our ZImagePromptEncoder (Flax Qwen3 and the folder's tokenizer) against
    ZImagePipeline.encode_prompt (chat template) and ZImageOmniPipeline.encode_prompt with a
    condition image (three segments): hidden_states[-2] at the real tokens."""
    from diffusers import ZImageOmniPipeline, ZImagePipeline

    model = _torch_qwen3(seed=2)
    tokenizer = _tokenizer(tmp_path / "pipeline" / "tokenizer")
    model.save_pretrained(tmp_path / "pipeline" / "text_encoder")
    encode = transformers_text.ZImagePromptEncoder(tmp_path / "pipeline", max_sequence_length=40,
                                                   batch_size=4)
    prompts = ["a red cat sat on a mat", "ed"]
    t2i = ZImagePipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=tokenizer,
                         transformer=None)
    omni = ZImageOmniPipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=tokenizer,
                              transformer=None, siglip=None, siglip_processor=None)
    with torch.no_grad():
        theirs_t2i, negative = t2i.encode_prompt(list(prompts), torch.device("cpu"),
                                                 max_sequence_length=40)
        theirs_omni, _ = omni.encode_prompt(list(prompts), torch.device("cpu"),
                                            do_classifier_free_guidance=False,
                                            max_sequence_length=40, num_condition_images=1)
    for images, theirs in ((0, [[t] for t in theirs_t2i]), (1, theirs_omni)):
        features, mask = encode(prompts, num_condition_images=images)
        assert features.shape[:2] == mask.shape[:2] == (2, len(theirs[0]))
        for i, segments in enumerate(theirs):
            for j, segment in enumerate(segments):
                ours = features[i, j][mask[i, j]]
                err = _max_err(ours, segment.numpy())
                assert err <= TOL, (images, i, j, err)
    empty, empty_mask = encode([""])
    assert _max_err(empty[0, 0][empty_mask[0, 0]], negative[0].numpy()) <= TOL


# --------------------------------------------------------------------------- SigLIP2


def _siglip_folder(root: Path, seed: int = 3):
    """A tiny Siglip2VisionModel (4 x 4 position grid, 4-pixel patches) and its NaFlex
    processor (at most 20 patches), saved as an omni pipeline's siglip / siglip_processor."""
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_patches=16, patch_size=4)
    model = randomize(Siglip2VisionModel(config), seed)
    processor = Siglip2ImageProcessor(patch_size=4, max_num_patches=20)
    model.save_pretrained(root / "siglip")
    processor.save_pretrained(root / "siglip_processor")
    return model, processor


def test_siglip_position_resize_and_parity(tmp_path: Path) -> None:
    """The resized position table (up along one axis, antialiased down along the other) and
    the tower on padded NaFlex patches, against transformers."""
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    from danceopd_jax.models.vision.siglip import SiglipVisionModel, position_weights

    table = np.random.default_rng(4).standard_normal((5, 5, 3)).astype(np.float32)
    for shape in ((3, 7), (8, 2), (5, 5)):
        theirs = Siglip2VisionEmbeddings.resize_positional_embeddings(
            torch.from_numpy(table), torch.tensor([shape]), max_length=60)[0].numpy()
        ours = position_weights(5, shape, 60) @ table.reshape(25, 3)
        assert _max_err(ours, theirs) <= 1e-5, shape

    model, _ = _siglip_folder(tmp_path)
    config, params = transformers_vision.load_transformers_siglip(tmp_path / "siglip")
    tower = with_params(lambda: SiglipVisionModel(config, rngs=nnx.Rngs(0)), params)
    rng = np.random.default_rng(5)
    pixels = rng.uniform(-1, 1, (2, 20, 48)).astype(np.float32)
    mask = np.arange(20)[None] < 15  # a 3 x 5 grid padded to 20 patches
    mask = np.repeat(mask, 2, axis=0)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(pixels),
                    pixel_attention_mask=torch.from_numpy(mask.astype(np.int32)),
                    spatial_shapes=torch.tensor([[3, 5], [3, 5]])).last_hidden_state.numpy()
    ours = nnx.jit(lambda m, x, k: m(x, k, (3, 5)))(tower, jnp.asarray(pixels), jnp.asarray(mask))
    err = _max_err(np.asarray(ours)[:, :15], ref[:, :15])
    print(f"SigLIP2 vision: max abs error {err:.2e}")
    assert err <= TOL
    with pytest.raises(ValueError, match="patch grid \\(5, 5\\) does not fit 20 patches"):
        position_weights(4, (5, 5), 20)


def test_siglip_features_match_the_omni_pipeline(tmp_path: Path) -> None:
    from diffusers import ZImageOmniPipeline
    from PIL import Image

    model, processor = _siglip_folder(tmp_path, seed=6)
    encode = transformers_vision.SiglipImageEncoder(tmp_path, batch_size=2)
    images = np.random.default_rng(7).integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)
    features = encode(images)
    omni = ZImageOmniPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                              transformer=None, siglip=model, siglip_processor=processor)
    with torch.no_grad():
        theirs = omni.prepare_siglip_embeds([Image.fromarray(im) for im in images], 1,
                                            torch.device("cpu"), torch.float32)[0]
    assert features.shape == (3, *theirs[0].shape) and features.shape[1] * features.shape[2] <= 20
    err = max(_max_err(features[i], t.numpy()) for i, t in enumerate(theirs))
    print(f"SigLIP2 omni features {features.shape}: max abs error {err:.2e}")
    assert err <= TOL

    bad = dict(model.state_dict())
    bad.pop("post_layernorm.bias")
    with pytest.raises(ValueError, match="missing \\(1\\):\n    post_layernorm.bias"):
        transformers_vision.convert_state_dict(bad, encode.config)


# --------------------------------------------------------------------------- no torch


def test_loading_never_imports_torch(tmp_path: Path) -> None:
    """The VAE decoder (loaded and run), Qwen3 and SigLIP2 load from their folders without
    torch."""
    _torch_vae(**VAE_VARIANTS["zimage"]).save_pretrained(tmp_path / "vae")
    _torch_qwen3().save_pretrained(tmp_path / "text_encoder")
    _siglip_folder(tmp_path)
    script = (
        "import sys; sys.modules['torch'] = None  # any torch import now fails\n"
        "from danceopd_jax.interop import diffusers_vae, transformers_text, "
        "transformers_vision\n"
        f"root = {str(tmp_path)!r}\n"
        "transformers_text.load_transformers_qwen3(root + '/text_encoder')\n"
        "transformers_vision.load_transformers_siglip(root + '/siglip')\n"
        "decode = diffusers_vae.ImageDecoder(root + '/vae', batch_size=2)\n"
        "import numpy as np\n"
        "images = decode(np.zeros((3, 2, 2, 16), np.float32))\n"
        "assert images.shape == (3, 4, 4, 3) and images.dtype == np.uint8, images.shape\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
